"""The model zoo: multi-exit architectures from the seed papers, by name.

A multi-exit model is an `nn.Module` with two `nn.ModuleList`s of equal length:
`blocks[k](*carry) -> carry` (a tensor or a tuple of tensors; the image for k = 0) and
`exits[k](*carry) -> logits` or `(logits, confidence)`, where `confidence` is a learned
per-sample score in [0, 1]. `forward(x)` returns the list of every exit's logits. That is
the whole contract `edgeexit.staging` needs, for zoo models and for a user's factory.

Zoo: `eenet_resnet` (EENets), `msdnet` (MSDNet, CIFAR variant), `ranet` (RANet), `emgnet`
(EMGNet multi-scale convolutions).
"""

from edgeexit.models.registry import ARCHITECTURES, build_model, load_weights, register  # noqa: F401
from edgeexit.models import eenet, emgnet, msdnet, ranet  # noqa: F401,E402  (register their architectures)
