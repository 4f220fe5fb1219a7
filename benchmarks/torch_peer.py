"""The torch peer run as a script: `python benchmarks/torch_peer.py FLAGS` is
`python -m torchref.peer FLAGS` (torchref/peer.py has the flags and the loop)."""

from torchref import peer

if __name__ == "__main__":
  peer.cli_main()
