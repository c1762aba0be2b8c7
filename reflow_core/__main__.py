"""``python -m reflow_core <command>`` (also what ``torchrun -m reflow_core train`` runs on every rank)."""

from reflow_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
