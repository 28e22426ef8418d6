"""medsight as a DICOM node beside a PACS: receive (Storage SCP) or poll (QIDO-RS / C-FIND) studies, route
series to bundles, keep a durable SQLite worklist, and send results back as DICOM (SR + Secondary Capture)
by STOW-RS or C-STORE. See docs/node.md."""
