"""python -m arcopo_fast.toy <build | measure | reproduce> [options]  (each subcommand has --help)."""

from __future__ import annotations

import sys

COMMANDS = {
    "build": ("arcopo_fast.toy.build", "rebuild every shipped toy-world weight and its manifest"),
    "measure": ("arcopo_fast.toy.measure", "reward spreads and TA recognition rate of the base model"),
    "reproduce": ("arcopo_fast.toy.reproduce", "the paper's claims side by side (table, plot, verdicts)"),
}


def usage() -> str:
    lines = ["usage: python -m arcopo_fast.toy <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = COMMANDS[name][0]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(f"error: {module} is not part of this installation", file=sys.stderr)
        return 2
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
