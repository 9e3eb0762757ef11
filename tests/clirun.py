"""Running the kvmmu command line in-process, as the CLI tests do: (exit code, stdout, stderr)."""

from __future__ import annotations

from kvmmu.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:  # noqa: ANN001  (pytest's capsys fixture)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
