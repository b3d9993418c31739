"""Sequence classifiers: an LSTM or GRU over (batch, time, features), a linear head on the last step."""

from __future__ import annotations

import kiln.nn as nn
from kiln.frontend.dsl.tensor import Tensor


class RecurrentClassifier(nn.Module):
    def __init__(self, cell: type, input_size: int, hidden_size: int, num_layers: int, num_classes: int, bidirectional: bool):
        super().__init__()
        self.rnn = cell(input_size, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (the graph input's name)
        output, _ = self.rnn(input)
        return self.fc(output[:, -1])


def lstm_classifier(input_size: int = 64, hidden_size: int = 128, num_layers: int = 2, num_classes: int = 10, bidirectional: bool = False) -> RecurrentClassifier:
    return RecurrentClassifier(nn.LSTM, input_size, hidden_size, num_layers, num_classes, bidirectional)


def gru_classifier(input_size: int = 64, hidden_size: int = 128, num_layers: int = 2, num_classes: int = 10, bidirectional: bool = False) -> RecurrentClassifier:
    return RecurrentClassifier(nn.GRU, input_size, hidden_size, num_layers, num_classes, bidirectional)
