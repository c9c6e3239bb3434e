/**
 * The target of guidance.test.ts: the "bug" is reached only when bytes 4..7
 * spell QEMU's qcow2 magic 'QFI\xfb', each byte checked in its own branch.
 * Blind mutation must get all four bytes at once (about 1 in 2^32 per try
 * even when aimed at the right offsets); coverage sees each branch taken and
 * keeps the input that got one byte further.
 */
export const MAGIC_INPUT_BYTES = 16;

export function magicChain(input: Uint8Array): boolean {
  if (input.length < 8) return false;
  if (input[4] !== 0x51) return false;
  if (input[5] !== 0x46) return false;
  if (input[6] !== 0x49) return false;
  if (input[7] !== 0xfb) return false;
  return true;
}
