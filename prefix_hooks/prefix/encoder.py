"""The module that produces every layer's prefix keys and values."""

from __future__ import annotations

import torch
from torch import nn

from prefix_hooks.core.parameter_versions import parameter_key
from prefix_hooks.prefix.config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """Trainable prefix keys/values for ``L`` attention layers, laid out as PEFT lays them.

    Without projection (or in inference mode) the encoder is one
    ``Embedding(P, L * 2 * token_dim)``. With ``prefix_projection`` it is
    ``Embedding(P, token_dim) -> Linear(token_dim, encoder_hidden_size) -> Tanh ->
    Linear(encoder_hidden_size, L * 2 * token_dim)``, the reparameterisation of the paper.

    The last dimension is ``(L, 2, kv_heads, head_dim)`` flattened: for layer ``i`` the
    keys come first, then the values, each head-major. Keys are used as they are (they
    are never rotated), so PEFT's ``prompt_embeddings`` tensor loads unchanged into
    ``embedding.weight``.

    Args:
        config: a resolved config (every dimension filled, see
            :func:`prefix_hooks.prefix.config.resolve_prefix_config`).
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        if config.token_dim is None or config.num_layers is None or config.encoder_hidden_size is None:
            raise ValueError("PrefixEncoder needs a resolved config; call resolve_prefix_config first")
        self.num_virtual_tokens = config.num_virtual_tokens
        self.output_dim = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, self.output_dim),
            )
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, self.output_dim)
        # (parameter identities and versions, folded prefix): reused while no gradient is needed
        self._folded: tuple[tuple[object, ...], torch.Tensor] | None = None

    def forward(self, prefix_tokens: torch.Tensor) -> torch.Tensor:
        """Encode prefix token indices.

        Args:
            prefix_tokens: ``(B, P)`` indices in ``[0, P)``.

        Returns:
            ``(B, P, L * 2 * token_dim)``.
        """
        hidden = self.embedding(prefix_tokens)  # (B, P, token_dim) or (B, P, L*2*token_dim)
        if self.prefix_projection:
            hidden = self.transform(hidden)  # (B, P, L*2*token_dim)
        return hidden

    def prefix(self) -> torch.Tensor:
        """All ``P`` positions at once, without an index lookup: ``(P, L * 2 * token_dim)``.

        Equal to ``forward(arange(P)[None])[0]``. In the plain form it is the embedding
        weight itself (no copy). With the projection, the MLP runs once and its output is
        reused for as long as no gradient is needed and no parameter has changed (a
        generate() call runs it once, not once per token; see
        :mod:`prefix_hooks.core.parameter_versions` for how a change is detected).
        """
        weight = self.embedding.weight  # (P, token_dim) or (P, L*2*token_dim)
        if not self.prefix_projection:
            return weight
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.transform(weight)  # (P, L*2*token_dim)
        key = parameter_key(self.parameters())
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, self.transform(weight))
        return self._folded[1]

    def forget(self) -> None:
        """Drop the memoized projection output (its parameters may have changed unseen)."""
        self._folded = None

    @torch.no_grad()
    def folded_weight(self) -> torch.Tensor:
        """The prefix as PEFT saves it (projection applied): ``(P, L * 2 * token_dim)``, computed afresh."""
        weight = self.embedding.weight
        return (self.transform(weight) if self.prefix_projection else weight).detach().clone()
