"""repro: the EHRMamba reproducibility report's package (data, tokenizer, models, training, statistics)."""

import sys

__version__ = "0.1.0"

# `import meds` reaches jsonschema (through flexible_schema), which imports rfc3987-syntax when it is
# installed (JupyterLab's jupyter-events pulls it in) and that compiles ~35 Lark grammars at import: 3.6 s of
# every repro process on a 2-core CPU (python-jsonschema/jsonschema#1428). No schema repro validates uses the
# "iri" formats it checks, so repro's processes (CLI, notebook kernels, training workers) go without it.
sys.modules.setdefault("rfc3987_syntax", None)
