"""What every job of the Ray layer shares: the Ray connection and path rules (`cluster`), local / s3:// file
access (`storage`) and MLflow (`tracking`: the driver's run and the workers' metric logging)."""
