"""What a user reads: the printed blocks (`text`), the PNGs (`plots`), the entry points (`outputs`)."""
