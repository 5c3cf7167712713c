"""Reading and writing particle stacks, maps, RELION/cryoSPARC/cryoDRGN metadata.

The one container is :class:`ParticleSet` (metadata + lazy memory-mapped images), read from any
supported format by :func:`load_particles`. Format conventions are converted at this edge; see
``docs/conventions.md`` ("RELION and cryoSPARC", "Contrast").
"""

from cryospin.io.cs import (
    cryosparc_pose_from_rotation,
    cryosparc_shift_from_shift_px,
    read_cryosparc,
    read_cs_table,
    rotation_from_cryosparc_pose,
    shift_px_from_cryosparc_shift,
    write_cryosparc,
)
from cryospin.io.mrc import (
    ImageStack,
    StackWriter,
    clear_stack_cache,
    open_stack,
    read_map,
    write_map,
    write_stack,
)
from cryospin.io.mrc_header import read_header
from cryospin.io.particles import (
    ParticleSet,
    load_indices,
    load_particles,
    write_cryodrgn_ctf,
    write_cryodrgn_poses,
    write_particles_star,
)
from cryospin.io.pkl import (
    cryodrgn_trans_from_shift_px,
    read_cryodrgn_ctf,
    read_cryodrgn_poses,
    shift_px_from_cryodrgn_trans,
)
from cryospin.io.star import (
    read_relion_star,
    relion_euler_from_rotation,
    relion_origin_from_shift_px,
    rotation_from_relion_euler,
    shift_px_from_relion_origin,
)
from cryospin.io.star_tables import merge_optics, pixel_sizes_angstrom, read_star_tables
from cryospin.io.star_write import write_relion_star

__all__ = [
    # container
    "ParticleSet",
    "load_particles",
    "load_indices",
    "write_particles_star",
    "write_cryodrgn_poses",
    "write_cryodrgn_ctf",
    # MRC
    "read_header",
    "read_map",
    "write_map",
    "ImageStack",
    "open_stack",
    "clear_stack_cache",
    "write_stack",
    "StackWriter",
    # RELION
    "read_star_tables",
    "merge_optics",
    "pixel_sizes_angstrom",
    "read_relion_star",
    "write_relion_star",
    "rotation_from_relion_euler",
    "relion_euler_from_rotation",
    "shift_px_from_relion_origin",
    "relion_origin_from_shift_px",
    # cryoSPARC
    "read_cs_table",
    "read_cryosparc",
    "rotation_from_cryosparc_pose",
    "cryosparc_pose_from_rotation",
    "shift_px_from_cryosparc_shift",
    "cryosparc_shift_from_shift_px",
    "write_cryosparc",
    # cryoDRGN
    "read_cryodrgn_ctf",
    "read_cryodrgn_poses",
    "shift_px_from_cryodrgn_trans",
    "cryodrgn_trans_from_shift_px",
]
