"""The `microvm` backend: a KVM guest per worker under QEMU or Firecracker, and its guest image."""
