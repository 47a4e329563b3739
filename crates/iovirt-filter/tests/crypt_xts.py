#!/usr/bin/env python3
"""Independent AES-XTS-plain64 for the LUKS interop tests (Python's `cryptography`, i.e. OpenSSL).

usage: crypt_xts.py decrypt|encrypt IMAGE KEY_HEX DATA_OFFSET SECTOR_SIZE IV_OFFSET START LEN FILE
       crypt_xts.py luks2-image IMAGE KEY_FILE OUT

decrypt: read LEN bytes of plaintext at byte START of the data segment of IMAGE into FILE.
encrypt: write LEN bytes from FILE as plaintext at byte START of the data segment of IMAGE.
The tweak of a sector is (IV_OFFSET + index from the segment start), little-endian, 16 bytes.
luks2-image: decrypt the whole data segment of the LUKS2 image IMAGE into OUT, with the
volume key and layout that cryptsetup reports when given KEY_FILE (no device-mapper needed):
the host-side check of what a guest wrote through an encrypted stack.
"""
import json
import subprocess
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def luks2_image(image, key_file, out_path):
    meta = json.loads(subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", image],
        check=True, capture_output=True, text=True).stdout)
    dump = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", key_file, image],
        check=True, capture_output=True, text=True).stdout
    hex_key, in_key = "", False
    for line in dump.splitlines():
        if line.startswith("MK dump:"):
            in_key, line = True, line[len("MK dump:"):]
        elif not (in_key and line[:1].isspace()):
            in_key = False
            continue
        hex_key += "".join(line.split())
    key = bytes.fromhex(hex_key)
    segments = meta["segments"]
    if len(segments) != 1:
        sys.exit("expected one data segment")
    seg = next(iter(segments.values()))
    if seg["encryption"] != "aes-xts-plain64":
        sys.exit("unsupported cipher " + seg["encryption"])
    ss, offset = seg["sector_size"], int(seg["offset"])
    iv = int(seg["iv_tweak"]) // (ss // 512)
    with open(image, "rb") as img, open(out_path, "wb") as out:
        img.seek(0, 2)
        end = img.tell() if seg["size"] == "dynamic" else offset + int(seg["size"])
        img.seek(offset)
        sector = iv
        while img.tell() + ss <= end:
            chunk = img.read(min(1 << 20, (end - img.tell()) // ss * ss))
            pt = bytearray()
            for i in range(0, len(chunk), ss):
                d = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little"))).decryptor()
                pt += d.update(chunk[i:i + ss]) + d.finalize()
                sector += 1
            out.write(pt)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "luks2-image":
        luks2_image(*sys.argv[2:])
        return
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
