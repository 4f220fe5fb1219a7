"""The lab's TinyLMs (`tinylm`), the blockwise tied cross entropy (`tied_nll`), torch I/O (`torch_io`)."""
