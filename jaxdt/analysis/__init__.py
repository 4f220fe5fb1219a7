"""Host-side analyses of a trajectory file: open it (`trajectory`), stream it once (`stream`),
the lab's analyses (`metrics`), two runs side by side (`compare`)."""
