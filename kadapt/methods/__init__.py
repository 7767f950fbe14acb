"""The methods, one module each. Importing a module registers its method (``@register``); this list is the
registry's one line per method: add a new method's module here."""
from kadapt.methods import (  # noqa: F401
    bottleneck,
    bitfit,
    full_finetune,
    lora,
    parallel,
    kernel_mix,
    prefix,
    inducer,
    mam,
    prompt,
    said,
)
