"""How much do FC and SC steer the synthetic images?
Prototype geometry and per-term image gradients.

For a CAL teacher trained on a validation set (default `fgsynth:seed=7`; the teacher is reused from
bench/quality_probe.py's work folder when it is there) this prints

- prototype geometry: ||P_k|| against ||z|| = 1, the distances d(z, P_own) and d(z, P_other) of real
  images (raw prototypes and unit-norm ones), and nearest-prototype accuracy;
- the attention maps' resolution (what SC compares);
- the L2 norm of the gradient on the images of each distillation term (r·CE_cal + (1−r)·CE_bb,
  r_bn·BN, λ_FC·FC with raw and with unit-norm prototypes, λ_SC·SC), at the patch initialisation of
  ipc index 1 with index 0 as the already distilled image, averaged over a few augmentation draws.

A term whose gradient is orders of magnitude below the others cannot change
the images, whatever its weight says.
Run: `.venv/bin/python bench/fd2_terms.py --seeds 0 1`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import make_ctx  # noqa: E402
from fd2_core.data.dataset import load_dataset  # noqa: E402
from fd2_core.losses import BNStatMatcher, fc_loss, pairwise_normalized_l2_distance, sc_loss  # noqa: E402
from fd2_core.runtime import frozen, generator  # noqa: E402
from fd2_core.spec_resolution import resolve_spec  # noqa: E402
from fd2_core.stages.patches import patch_init  # noqa: E402
from fd2_core.stages.pretrain import pretrain  # noqa: E402
from fd2_core.stages.synthesis import distill_augment  # noqa: E402


def prototype_geometry(teacher, ctx) -> dict[str, float]:
    images = ctx.normalize(ctx.data.test_images).float()
    labels = ctx.data.test_labels
    with torch.no_grad(), frozen(teacher):
        z = teacher(images).cal.embedding.float()
    protos = teacher.cal_head.prototypes.float()
    own = F.one_hot(labels, protos.shape[0]).bool()
    out = {"prototype_norm": protos.norm(dim=1).mean().item(), "embedding_norm": z.norm(dim=1).mean().item()}
    for name, p in (("raw", protos), ("unit", F.normalize(protos, dim=1))):
        d = pairwise_normalized_l2_distance(z, p)
        out[f"d_own_{name}"] = d[own].mean().item()
        out[f"d_other_{name}"] = d[~own].mean().item()
        out[f"nearest_prototype_acc_{name}"] = (d.argmin(1) == labels).float().mean().item()
    return out


def term_gradients(teacher, ctx, draws: int = 4) -> dict[str, float]:
    spec = ctx.spec
    classes = torch.arange(ctx.num_classes)
    g = generator(spec.seed, "fd2-terms")
    previous = patch_init(ctx, teacher, classes, 0)
    current = patch_init(ctx, teacher, classes, 1)
    sums: dict[str, float] = {}
    with frozen(teacher), BNStatMatcher(teacher.bn_layers(), spec.first_bn_multiplier) as bn:
        for _ in range(draws):
            with torch.no_grad(), bn.paused():
                prev_maps = teacher(distill_augment(ctx, previous, g)).cal.attention.float()[None]
            x = current.clone().requires_grad_(True)
            out = teacher(distill_augment(ctx, x, g))
            y = classes
            protos = teacher.cal_head.prototypes
            terms = {
                "ce": spec.cal_ratio * F.cross_entropy(out.cal.logits.float(), y)
                + (1 - spec.cal_ratio) * F.cross_entropy(out.logits.float(), y),
                "bn": spec.r_bn * bn.loss(),
                "fc_raw": spec.lambda_fc * fc_loss(out.cal.embedding, y, protos, spec.fc_rho).total,
                "fc_unit": spec.lambda_fc * fc_loss(out.cal.embedding, y, protos, spec.fc_rho, True).total,
                "sc": spec.lambda_sc * sc_loss(out.cal.attention.float(), prev_maps),
            }
            for n in terms:
                (gx,) = torch.autograd.grad(terms[n], x, retain_graph=True)
                sums[n] = sums.get(n, 0.0) + gx.norm().item() / draws
                sums[n + "_value"] = sums.get(n + "_value", 0.0) + terms[n].item() / draws
    sums["attention_hw"] = float(out.cal.attention.shape[-1])
    return sums


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fgsynth:seed=7")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=ROOT / ".fd2" / "quality_probe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    overrides = dict(item.split("=", 1) for item in args.set)
    for seed in args.seeds:
        spec = resolve_spec({"preset": "cpu-small", "device": "cpu", "seed": seed, "method": "fd2", **overrides})
        data = load_dataset(args.data, spec.image_size, seed=0, test_fraction=spec.test_fraction)
        ctx = make_ctx(spec, data, args.work / f"seed{seed}" / "teacher-cal")
        teacher = pretrain(ctx).model
        geo = prototype_geometry(teacher, ctx)
        grads = term_gradients(teacher, ctx)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in {**geo, **grads}.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
