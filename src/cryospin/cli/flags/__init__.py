"""The help and flags of each subcommand, one module per command: its docstring is the
command's ``--help`` and ``add_args(parser)`` registers its flags.

These modules import no more than argparse and the torch-free configuration, so that
``cryospin --help`` and ``cryospin COMMAND --help`` stay fast; the module that runs a command,
:mod:`cryospin.cli.<command>`, is imported only to run it (:mod:`cryospin.cli.main`).
"""
