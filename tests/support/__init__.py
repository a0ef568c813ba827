"""What the tests share: real peers (Orthanc, dcmtk), DICOM files in every transfer syntax, test PKI, references."""
