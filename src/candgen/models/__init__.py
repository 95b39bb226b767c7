"""Retrieval models: a two-tower baseline, SASRec and an HSTU-style sequential transducer."""

from candgen.data.tensors import Batch
from candgen.models.base import RetrievalModel
from candgen.models.losses import full_softmax_loss, sampled_softmax_loss
from candgen.models.sequential import HSTU, SASRec
from candgen.models.two_tower import TwoTower

__all__ = [
    "HSTU",
    "Batch",
    "RetrievalModel",
    "SASRec",
    "TwoTower",
    "full_softmax_loss",
    "sampled_softmax_loss",
]
