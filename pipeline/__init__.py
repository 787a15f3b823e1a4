"""Apache Beam jobs around qn_keras: the feature job turns speech manifests into sharded
TFRecords of log-mel features (``pipeline.features_job``)."""
