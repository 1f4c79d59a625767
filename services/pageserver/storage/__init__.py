"""The page server's layered storage (issue 12; Neon's model, our own code).

Modules, lower layers first: errors; values (a version's encoding); store (where files
live: disk and memory); blockfile (the checksummed, LZ4-block file scheme); layer_desc
(a layer's ranges and file name); layer_file, delta_layer, image_layer (the two layer
formats); layer_map (which layers a read visits); manifest (a timeline's live layers and
disk_consistent_lsn).
"""
