"""Data: the default recipe, loading and checking a corpus, the in-step sampler, the counts report.

Host side: `recipe` (build the embedded default), `corpus` (load and check the
lab's three files), `vocabulary` (encode, count, masks, token classes),
`demographics` (the printed counts). Inside `jit`: `sampler` (batch t as a pure
function of the data key and t).
"""
