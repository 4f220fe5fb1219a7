"""The lab's Crucible 1 model and training step in PyTorch, as the notebook wrote them.

A port of the lab's Crucible 1 notebook, cells 6-11: `TextDataset` (cell 6, with the
token ids given instead of encoded here), `TinyLM` (cell 7, unchanged: the one copy of
the lab's model class in this repository), `compute_ulp_bf16` (cell 9) and
`train_step` (cell 11's forward under `torch.autocast(bf16)`, loss, backward and
AdamW step). The lab's hyperparameters are the module's constants. jaxdt never
imports this package; the parity tests, the torch peer (`torchref.peer`) and the
timing baseline (benchmarks/torch_crucible1.py) do.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

HIDDEN_DIM, NUM_LAYERS, NUM_HEADS = 64, 2, 2
LEARNING_RATE, WEIGHT_DECAY, BETA1, BETA2, EPSILON = 1e-3, 0.0, 0.9, 0.999, 1e-8
RANDOM_SEED = 42
MOTION_THRESHOLD = 0.1


class TextDataset(Dataset):  # cell 6, with the ids given instead of encoded here
  def __init__(self, tokens, seq_len):
    self.tokens = tokens
    self.seq_len = seq_len
    self.n_sequences = len(self.tokens) // seq_len

  def __len__(self):
    return self.n_sequences

  def __getitem__(self, idx):
    start = idx * self.seq_len
    chunk = self.tokens[start:start + self.seq_len]
    return torch.tensor(chunk, dtype=torch.long)


class TinyLM(nn.Module):  # cell 7, unchanged
  def __init__(self, vocab_size, hidden_dim, num_layers, num_heads, seq_len):
    super().__init__()

    self.embedding = nn.Embedding(vocab_size, hidden_dim)
    self.pos_embedding = nn.Embedding(seq_len, hidden_dim)

    encoder_layer = nn.TransformerEncoderLayer(
        d_model=hidden_dim,
        nhead=num_heads,
        dim_feedforward=hidden_dim * 4,
        dropout=0.0,
        activation='gelu',
        batch_first=True,
        norm_first=True
    )
    self.transformer = nn.TransformerEncoder(encoder_layer, num_layers=num_layers)
    self.ln_f = nn.LayerNorm(hidden_dim)

    nn.init.normal_(self.embedding.weight, mean=0.0, std=0.02)
    nn.init.normal_(self.pos_embedding.weight, mean=0.0, std=0.02)

  def forward(self, input_ids):
    batch_size, seq_len = input_ids.shape

    tok_emb = self.embedding(input_ids)
    pos_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
    pos_emb = self.pos_embedding(pos_ids)

    hidden = tok_emb + pos_emb
    causal_mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=input_ids.device)
    hidden = self.transformer(hidden, mask=causal_mask, is_causal=True)
    hidden = self.ln_f(hidden)

    logits = hidden @ self.embedding.weight.T
    return logits


def compute_ulp_bf16(tensor_bf16: torch.Tensor) -> torch.Tensor:  # cell 9
  """Compute ULP for each element of a bfloat16 tensor."""
  bits = tensor_bf16.view(torch.uint16).to(torch.int32)
  exponent = (bits >> 7) & 0xFF
  effective_exp = torch.where(exponent == 0, torch.ones_like(exponent), exponent)
  ulp = torch.pow(2.0, (effective_exp - 134).float())
  return ulp


def train_step(model, optimizer, loss_fn, input_ids, device, vocab_size, autocast=True):
  """Cell 11's forward, loss, backward and optimizer step for one batch; returns the loss."""
  with torch.autocast(device_type=device if device != 'mps' else 'cpu', dtype=torch.bfloat16,
                      enabled=autocast):
    logits = model(input_ids)
    shift_logits = logits[:, :-1, :].contiguous()
    shift_labels = input_ids[:, 1:].contiguous()
    loss = loss_fn(shift_logits.view(-1, vocab_size), shift_labels.view(-1))
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss
