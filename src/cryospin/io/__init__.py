"""Reading and writing particle stacks, maps, RELION/cryoSPARC/cryoDRGN metadata."""
