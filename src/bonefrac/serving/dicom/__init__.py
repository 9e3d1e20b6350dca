"""The DICOM node (``bonefrac dicom-node``, needs the ``[dicom-node]`` extra: pynetdicom,
highdicom): receives studies by C-STORE, predicts them as ``bonefrac predict`` does, and sends
a Structured Report and Secondary Captures back (modules: ``config``, ``spool``, ``node``,
``results``, ``sender``)."""
