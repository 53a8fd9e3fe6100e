"""slicelm: SliceGPT for Hugging Face causal language models.

import slicelm
model, tokenizer = slicelm.load_model("smollm2-135m")
samples = slicelm.load_calibration("c4", tokenizer, n_samples=64, seqlen=1024)
report = slicelm.slice_model(model, samples, slicelm.SliceConfig(sparsity=0.25))
slicelm.save_sliced(model, "out/smollm2-sliced", tokenizer)
model = slicelm.load_sliced("out/smollm2-sliced")
"""

from slicelm.allocate.planning import plan  # noqa: E402
from slicelm.config import SliceConfig  # noqa: E402
from slicelm.core.plan import SlicingPlan  # noqa: E402
from slicelm.errors import SlicelmError  # noqa: E402
from slicelm.io.models import load_model  # noqa: E402
from slicelm.layouts.checkpoint import load_sliced, save_sliced  # noqa: E402
from slicelm.recover.config import FinetuneConfig  # noqa: E402
from slicelm.slicing import slice_model  # noqa: E402
from slicelm.steps.executor import SliceReport, execute  # noqa: E402
from slicelm.version import __version__


def finetune(*args, **kwargs):
    """See :func:`slicelm.recover.recovery.finetune` (imported when called: ``import slicelm`` stays
    free of the training loop and its dependencies)."""
    # lazy on purpose: the recovery modules load when fine-tuning runs (peft only for LoRA)
    from slicelm.recover.recovery import finetune as _finetune

    return _finetune(*args, **kwargs)


def load_calibration(*args, **kwargs):
    """See :func:`slicelm.io.data.load_calibration` (imported when called)."""
    # lazy on purpose: `import slicelm` leaves io.data out; datasets loads inside it only for hub data
    from slicelm.io.data import load_calibration as _load

    return _load(*args, **kwargs)


__all__ = [
    "FinetuneConfig",
    "SliceConfig",
    "SliceReport",
    "SlicelmError",
    "SlicingPlan",
    "finetune",
    "load_calibration",
    "load_model",
    "execute",
    "load_sliced",
    "plan",
    "save_sliced",
    "slice_model",
    "__version__",
]
