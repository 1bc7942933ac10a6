"""``mergekitty inspect``: how fine-tunes of one base differ, layer by layer and module by module,
before merge weights are chosen.

- ``modules``: where a tensor sits (its row: a layer, or before/after the stack; its module kind);
- ``scan``: stream the models tensor by tensor through the native kernel (no torch);
- ``figures``: the sums per cell and the figures built from them (their definitions);
- ``config_params``: the parameters a merge config resolves to, per cell;
- ``table``, ``report_html``, ``picture``: the terminal tables, the HTML report, the PNG.
"""

from .figures import Inspection
from .scan import inspect_models, open_model

__all__ = ["Inspection", "inspect_models", "open_model"]
