"""Experiments built on the library: the HiSS low x high combination grid (`grid`)."""
