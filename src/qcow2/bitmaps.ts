/**
 * Persistent dirty bitmaps (qcow2.txt "Bitmaps") matter to us only as
 * cluster owners: check() must count their directory, tables and data
 * clusters, as QEMU's qcow2_check_bitmaps_refcounts() does, or they would
 * show up as leaks. Our writes never change guest data, so the bitmaps stay
 * consistent and the autoclear bit is kept.
 */
import { AutoclearFeature, HeaderExtensionType, type Qcow2Header } from './header.js';
import { corrupt } from './fail.js';
import { readExact, type MetaFile } from './file.js';

/** QEMU: QCOW2_MAX_BITMAPS = 65535, QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1 KiB per bitmap. */
export const QCOW2_MAX_BITMAP_DIRECTORY_BYTES = 1024 * 65535;
/** QEMU: BME_MAX_TABLE_SIZE entries per bitmap table. */
export const BME_MAX_TABLE_ENTRIES = 0x8000000;
const DIRECTORY_ENTRY_FIXED_BYTES = 24;

export interface BitmapRefs {
  /** [offset, length] byte ranges that each hold one reference. */
  ranges: Array<[number, number]>;
}

/** Every byte range the consistent bitmaps extension references; empty when there is none. */
export async function bitmapReferences(file: MetaFile, header: Qcow2Header, clusterSize: number, fileSizeBytes: number): Promise<BitmapRefs> {
  const ext = header.extensions.find((e) => e.type === HeaderExtensionType.BITMAPS);
  if (ext === undefined || (header.autoclearFeatures & AutoclearFeature.BITMAPS) === 0n) return { ranges: [] };
  const data = Buffer.from(ext.data);
  const count = data.readUInt32BE(0);
  const dirBytes = Number(data.readBigUInt64BE(8));
  const dirOffset = Number(data.readBigUInt64BE(16));
  if (dirBytes > QCOW2_MAX_BITMAP_DIRECTORY_BYTES || dirOffset + dirBytes > fileSizeBytes) {
    throw corrupt(`bitmap directory (${dirBytes} bytes at ${dirOffset}) is invalid`);
  }
  const ranges: Array<[number, number]> = [[dirOffset, dirBytes]];
  const dir = await readExact(file, dirOffset, dirBytes, 'bitmap directory');
  let offset = 0;
  for (let i = 0; i < count; i++) {
    if (offset + DIRECTORY_ENTRY_FIXED_BYTES > dir.length) throw corrupt('bitmap directory is truncated');
    const tableOffset = Number(dir.readBigUInt64BE(offset));
    const tableEntries = dir.readUInt32BE(offset + 8);
    const nameBytes = dir.readUInt16BE(offset + 18);
    const extraBytes = dir.readUInt32BE(offset + 20);
    if (tableEntries > BME_MAX_TABLE_ENTRIES || tableOffset + tableEntries * 8 > fileSizeBytes) {
      throw corrupt(`bitmap ${i} table (${tableEntries} entries at ${tableOffset}) is invalid`);
    }
    ranges.push([tableOffset, tableEntries * 8]);
    const table = await readExact(file, tableOffset, tableEntries * 8, 'bitmap table');
    for (let e = 0; e < tableEntries; e++) {
      const entryOffset = Number(table.readBigUInt64BE(e * 8) & 0x00fffffffffffe00n);
      if (entryOffset !== 0) ranges.push([entryOffset, clusterSize]);
    }
    offset = Math.ceil((offset + DIRECTORY_ENTRY_FIXED_BYTES + extraBytes + nameBytes) / 8) * 8;
  }
  return { ranges };
}
