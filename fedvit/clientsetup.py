"""What a method's client is built from: :class:`ClientSetup`.

The ClientApp adapter (:mod:`fedvit.client_app`) builds one per message and hands it to the
method's client class, which it finds through :mod:`fedvit.registry`; defined in core so that the
adapter never imports a method module (``clients/``), which all take it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedvit.config import FedvitConfig
from fedvit.params import ParameterSplit
from fedvit.state import PrivateStore


@dataclass
class ClientSetup:
    """Everything a client needs, built once per message by the ClientApp adapter."""

    cfg: FedvitConfig
    client_id: int
    model: nn.Module
    split: ParameterSplit
    data: Any  # fedvit.data.ClientDatasets
    store: PrivateStore
    device: torch.device
    node_config: Mapping[str, Any] = field(default_factory=dict)  # the SuperNode's --node-config
