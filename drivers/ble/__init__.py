"""BLE sensors: advertisement decoders (sans-I/O, ``decoders``) and the ``ble`` driver."""
