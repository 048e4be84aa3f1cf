"""glied: bottom-up regions + MIL attribute words + the GLIED captioner (Liu et al., IJCAI 2019)."""

__version__ = "0.1.0"
