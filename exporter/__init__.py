"""intune-provisioning-exporter: watch users travel the hybrid Intune provisioning pipeline."""

__version__ = "0.1.0"
