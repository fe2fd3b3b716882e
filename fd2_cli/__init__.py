"""The `fd2` command, the top floor of the project: it may import every package below it (`fd2_core`, `store`,
`worker`, and `api` by name), and none of them imports it, so a command can change without touching a layer.

`fd2_cli.main` builds the parser and holds the service commands (`serve`, `worker`, `keys`, `migrate`);
`fd2_cli.serve` runs the two child processes of `fd2 serve`. The library's commands (`distill`, `data`) stay
in `fd2_core.cli` and are mounted here through its `register_commands`: the library runs alone
(`python -m fd2_core distill …`) with no database, broker or service package, and its refusals are part of
its interface (docs/INTERFACES.md), so moving them up would make the library's own command depend on the
service.
"""
