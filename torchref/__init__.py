"""The lab's PyTorch reference: its Crucible 1 model and step (`torchref.lab`), the f32 GEMM
route for CPUs without bf16 units (`torchref.gemm`), and the peer run that writes a jaxdt run
folder (`torchref.peer`, with `torchref.capture`). jaxdt never imports it."""
