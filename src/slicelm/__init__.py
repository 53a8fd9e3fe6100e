"""slicelm: SliceGPT for Hugging Face causal language models.

import slicelm
model, tokenizer = slicelm.load_model("smollm2-135m")
samples = slicelm.load_calibration("c4", tokenizer, n_samples=64, seqlen=1024)
report = slicelm.slice_model(model, samples, slicelm.SliceConfig(sparsity=0.25))
slicelm.save_sliced(model, "out/smollm2-sliced", tokenizer)
model = slicelm.load_sliced("out/smollm2-sliced")
"""

from slicelm.errors import SlicelmError
from slicelm.lazy import lazy_exports
from slicelm.version import __version__

# The public API, imported on first use (PEP 562): ``import slicelm`` and ``slicelm --help`` load no torch,
# and fine-tuning's and the data's dependencies load only when their functions are used.
_EXPORTS = {
    "FinetuneConfig": "slicelm.recover.config",
    "SliceConfig": "slicelm.config",
    "SliceReport": "slicelm.steps.executor",
    "SlicingPlan": "slicelm.core.plan",
    "execute": "slicelm.steps.executor",
    "finetune": "slicelm.recover.recovery",
    "load_calibration": "slicelm.io.data",
    "load_model": "slicelm.io.models",
    "load_sliced": "slicelm.layouts.checkpoint",
    "plan": "slicelm.allocate.planning",
    "save_sliced": "slicelm.layouts.checkpoint",
    "slice_model": "slicelm.slicing",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = ["SlicelmError", "__version__", *sorted(_EXPORTS)]
