// Numbers and times as a person reads them; the exact value stays on the element (data-value) for tools.

export function percent(value, digits = 1) {
  return typeof value === "number" && Number.isFinite(value) ? `${(100 * value).toFixed(digits)} %` : "–";
}

export function points(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  const sign = value > 0 ? "+" : "";
  return `${sign}${(100 * value).toFixed(1)} points`;
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(size) {
  if (typeof size !== "number") return "–";
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${size} B` : `${value.toFixed(1)} ${UNITS[unit]}`;
}

export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

export function yesNo(value) {
  return value === true ? "yes" : value === false ? "no" : "–";
}
