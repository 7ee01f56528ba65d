"""The paper's comparison on your own teacher and data: one program, resumable stages.

    python -m rskd_jax.compare --config configs/reproduce.yaml [--estimate] [key=value ...]
    python -m rskd_jax.compare --config configs/demo.yaml          # `make demo`: a small one

data -> ONE teacher pass writing every store -> one student per method (same architecture,
init and data order) -> eval (teacher online) -> gradient check -> step timing -> report
(results.json, plots, the README's Results section). Progress and every stage's result go to
<reproduce.output>/state.json; a re-run skips what is done and resumes what was interrupted.
`--estimate` runs the data stage, a cache dry run and a short step timing and writes the
projected wall time of every stage to <results_dir>/estimate.json instead.

Modules: config (the root config), state (state.json, fingerprints), sources (text sources,
the merged token store), stages (the pipeline), runtime (what the model-running stages share),
evaluation, gradcheck, timing, results (the results.json object), plots, report.
"""

from rskd_jax.compare.config import CompareConfig, CompareRun, MethodConfig, PipelineRun, SourceConfig
from rskd_jax.compare.stages import Comparison
from rskd_jax.compare.state import CompareError

__all__ = [
    "CompareConfig",
    "CompareError",
    "CompareRun",
    "Comparison",
    "MethodConfig",
    "PipelineRun",
    "SourceConfig",
]
