#!/usr/bin/env python3
"""Independent AES-XTS-plain64 for the LUKS interop tests (Python's `cryptography`, i.e. OpenSSL).

usage: crypt_xts.py decrypt|encrypt IMAGE KEY_HEX DATA_OFFSET SECTOR_SIZE IV_OFFSET START LEN FILE

decrypt: read LEN bytes of plaintext at byte START of the data segment of IMAGE into FILE.
encrypt: write LEN bytes from FILE as plaintext at byte START of the data segment of IMAGE.
The tweak of a sector is (IV_OFFSET + index from the segment start), little-endian, 16 bytes.
"""
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def main():
    op, image, key_hex, data_offset, sector_size, iv_offset, start, length, path = sys.argv[1:]
    key = bytes.fromhex(key_hex)
    data_offset, ss, iv, start, length = map(int, (data_offset, sector_size, iv_offset, start, length))
    assert start % ss == 0 and length % ss == 0
    with open(image, "r+b") as img:
        if op == "decrypt":
            img.seek(data_offset + start)
            ct = img.read(length)
            out = bytearray()
            for i in range(0, length, ss):
                tweak = (iv + (start + i) // ss).to_bytes(16, "little")
                d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
                out += d.update(ct[i:i + ss]) + d.finalize()
            with open(path, "wb") as f:
                f.write(out)
        elif op == "encrypt":
            with open(path, "rb") as f:
                pt = f.read(length)
            out = bytearray()
            for i in range(0, length, ss):
                tweak = (iv + (start + i) // ss).to_bytes(16, "little")
                e = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
                out += e.update(pt[i:i + ss]) + e.finalize()
            img.seek(data_offset + start)
            img.write(out)
        else:
            sys.exit("unknown operation " + op)


if __name__ == "__main__":
    main()
