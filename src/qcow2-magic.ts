/**
 * The qcow2 magic, "QFI\xfb" (qcow2.txt "Header", bytes 0-3). A leaf: the
 * qcow2 reader checks it, and the raw sink (a lower layer) checks it so that
 * a raw write does not overwrite an image by mistake.
 */
export const QCOW_MAGIC = 0x514649fb;
