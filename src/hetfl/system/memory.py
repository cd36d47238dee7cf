"""Peak training-memory estimates, to check a method's knobs against a device's memory.

These are analytical estimates (weights + gradients + optimizer state + saved activations),
not measurements: allocator fragmentation, framework workspace and the CUDA/runtime context
are not counted.
"""

from __future__ import annotations

from hetfl.errors import ConfigError
from hetfl.system.devices import DeviceProfile

# fp32 optimizer-state tensors kept per trainable parameter.
_OPTIMIZER_SLOTS = {
    "sgd": 0,  # plain SGD keeps nothing between steps
    "sgd_momentum": 1,  # momentum buffer
    "adam": 2,  # first and second moments
    "adamw": 2,  # same state as Adam; decoupled weight decay adds none
}
_STATE_BYTES = 4  # optimizer state is kept in fp32 even when weights are lower precision


def estimate_training_memory(
    frozen_params: int,
    trainable_params: int,
    *,
    optimizer: str,
    activation_bytes: int,
    bytes_per_param: int = 4,
) -> int:
    """Bytes needed at the peak of one training step.

    Breakdown, with ``P_f`` frozen and ``P_t`` trainable parameters and ``b = bytes_per_param``:

    - weights: ``(P_f + P_t) * b``
    - gradients: ``P_t * b`` (frozen parameters get none)
    - optimizer state: ``slots * P_t * 4`` with ``slots`` = 0 for ``sgd``, 1 for
      ``sgd_momentum``, 2 for ``adam``/``adamw`` (fp32 state)
    - activations saved for backward: ``activation_bytes`` (see
      `transformer_activation_bytes`)

    Example: 1M frozen, 10k trainable, AdamW, 1 MB activations, fp32:
    4e6 + 4e4 + 4e4 + 8e4 + 1e6 = 5,160,000 bytes.

    Args:
        frozen_params: Parameters that receive no gradient (e.g. the base model under LoRA).
        trainable_params: Parameters updated by the optimizer.
        optimizer: ``sgd``, ``sgd_momentum``, ``adam`` or ``adamw``.
        activation_bytes: Bytes of activations kept for the backward pass.
        bytes_per_param: Bytes per weight and per gradient element (4 for fp32, 2 for fp16/bf16).

    Returns:
        Estimated peak bytes.

    Raises:
        ConfigError: On an unknown optimizer.
        ValueError: On a negative count or a non-positive ``bytes_per_param``.
    """
    if optimizer not in _OPTIMIZER_SLOTS:
        raise ConfigError(
            f"train.optimizer: unknown optimizer '{optimizer}' "
            f"(choose from {', '.join(_OPTIMIZER_SLOTS)})"
        )
    if min(frozen_params, trainable_params, activation_bytes) < 0 or bytes_per_param <= 0:
        raise ValueError(
            "parameter counts and activation_bytes must be >= 0 and bytes_per_param > 0, got "
            f"{frozen_params}, {trainable_params}, {activation_bytes}, {bytes_per_param}"
        )
    weights = (frozen_params + trainable_params) * bytes_per_param
    grads = trainable_params * bytes_per_param
    state = _OPTIMIZER_SLOTS[optimizer] * trainable_params * _STATE_BYTES
    return int(weights + grads + state + activation_bytes)


def transformer_activation_bytes(
    batch: int,
    seq_len: int,
    hidden: int,
    n_layers: int,
    *,
    intermediate: int | None = None,
    n_heads: int | None = None,
    bytes_per_el: int = 4,
) -> int:
    """Activations a pre-LayerNorm transformer stack saves for backward, without recomputation.

    Per layer, with ``s = seq_len``, ``b = batch``, ``h = hidden``, ``f = intermediate``
    (default ``4h``) and no dropout, the tensors kept for backward are: LN1 input (sbh), QKV
    projection input (sbh), Q, K, V (3sbh), attention-output projection input (sbh), LN2
    input (sbh), FC1 input (sbh), activation-function input (sbf) and FC2 input (sbf):

        elements per layer = s*b*(8h + 2f)      [+ b*a*s*s if n_heads=a is given]

    The optional term is the softmax output of eager (unfused) attention; leave ``n_heads``
    as ``None`` for fused attention kernels (SDPA / flash) that do not keep the s x s matrix.
    With ``f = 4h`` this is 16sbh elements, i.e. 32sbh bytes in fp16, which matches
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models": 34sbh + 5as^2b bytes per layer) once their dropout masks (2sbh + as^2b bytes)
    and attention-dropout output (2as^2b bytes) are set aside. Embeddings, the final norm and
    the output logits (b*s*vocab) are not included; add them when they matter. For LoRA the
    count is an upper bound: inputs of frozen linears without an adapter need not be kept.

    Args:
        batch: Sequences per step.
        seq_len: Tokens per sequence.
        hidden: Model width.
        n_layers: Number of transformer blocks.
        intermediate: MLP width; defaults to ``4 * hidden``.
        n_heads: Attention heads; set it to count the eager-attention probabilities.
        bytes_per_el: Bytes per activation element (4 for fp32).

    Returns:
        Estimated bytes.

    Raises:
        ValueError: On a negative size or non-positive ``bytes_per_el``.
    """
    f = 4 * hidden if intermediate is None else intermediate
    a = 0 if n_heads is None else n_heads
    if min(batch, seq_len, hidden, n_layers, f, a) < 0 or bytes_per_el <= 0:
        raise ValueError("sizes must be >= 0 and bytes_per_el > 0")
    per_layer = seq_len * batch * (8 * hidden + 2 * f) + batch * a * seq_len * seq_len
    return int(n_layers * per_layer * bytes_per_el)


def fits(mem_bytes: int, dev: DeviceProfile) -> bool:
    """Whether ``mem_bytes`` fits in the device's training memory (``mem_mb`` MiB, 2**20 bytes)."""
    return mem_bytes <= dev.mem_mb * 2**20
