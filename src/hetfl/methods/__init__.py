"""Built-in methods; importing this package registers them."""

from hetfl.methods import fedavg_full, fedit  # noqa: F401
from hetfl.methods import flexlora, flora_stack, fslora, heterolora  # noqa: F401
from hetfl.methods import ditto, fedv, fedvz, sflam, splitfed_v1, splitfed_v2  # noqa: F401
from hetfl.methods import ensemble, floral, local_adaptor  # noqa: F401
