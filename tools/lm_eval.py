"""lm-eval-harness's own command line, with the `pretrain` model type registered.

    pretrain-lm-eval --model pretrain --model_args checkpoint=runs/NAME,batch_size=16 \\
        --tasks hellaswag,arc_easy --output_path results/

Every argument is lm-eval's (`lm-eval run --help`); this command only imports
`pretrain.eval.harness` first, so that the harness's registry knows `--model pretrain`.
Needs the `eval` extra: pip install '.[eval]'.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        import pretrain.eval.harness  # noqa: F401  (registers model="pretrain")
    except ImportError as e:
        print(f"error: pretrain-lm-eval needs lm-eval ({e}); install the extra: "
              "pip install 'pretrain[eval]'", file=sys.stderr)
        return 2
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "pretrain-lm-eval"
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
