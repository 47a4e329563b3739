//! PCI: placeholder, replaced by the PCI work.
