"""TF Serving export, clients, a local server, batch transcription and TFLite for qn_keras models."""
