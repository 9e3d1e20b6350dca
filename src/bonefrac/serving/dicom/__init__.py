"""The DICOM node (``bonefrac dicom-node``, needs the ``[dicom-node]`` extra: pynetdicom,
highdicom): receives studies by C-STORE, predicts them as ``bonefrac predict`` does, and sends
a Structured Report, Secondary Captures and Grayscale Softcopy Presentation States back by
C-STORE or STOW-RS (modules: ``config``, ``spool``, ``node``, ``results``, ``presentation``,
``sender``, ``stow``)."""
