"""VoCo -> MAE pretraining of ResEnc-L from openmind-tools stores."""
