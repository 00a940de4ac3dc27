/* Decode only a rectangle of a JPEG: the RandomResizedCrop box, before it is resized.
 *
 * A train crop covers 8-100% of the image (about half on average), so most of a full decode is thrown away.
 * libjpeg-turbo (>= 1.5) can skip it: jpeg_skip_scanlines() passes the rows above the box without inverse
 * DCT, upsampling or colour conversion, jpeg_crop_scanline() limits those to the box's columns, and the rows
 * below it are never decoded. On the benchmark's JPEGs: 0.61 against 0.82 ms an image, 1 core (make bench-stages).
 *
 * The pixels equal a full decode's, cropped (tests/test_decode.py checks it): the region asked of libjpeg is
 * widened by a pixel on each side, so chroma upsampling at the box's edges sees the same neighbours as in
 * a full decode (libjpeg widens it further, to an iMCU boundary, on the left), and to at least 32 pixels
 * (a 1-pixel-wide region of a 4:2:0 image came out different).
 *
 *     header(data) -> (height, width)
 *     decode_crop(data, top, left, height, width) -> (bytearray of rows x cols x 3 RGB, rows, cols, x)
 *         the box is columns x .. x + width - 1 of that buffer
 *
 * Both raise ValueError with libjpeg's message for anything libjpeg refuses or warns about (corrupt data,
 * colour spaces it cannot turn into RGB such as CMYK); the caller then falls back to a full decode, which
 * decides whether the file is bad. The GIL is held throughout: DataLoader workers are processes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) { /* a warning: corrupt data that libjpeg would paper over with grey; refuse it */
        on_error(cinfo);
    }
}

/* Before setjmp: errors raised from here on land there, and jpeg_destroy_decompress is safe from the start. */
static void init_errors(struct jpeg_decompress_struct *cinfo, ErrorManager *err) {
    cinfo->err = jpeg_std_error(&err->pub);
    cinfo->mem = NULL;
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->message[0] = '\0';
}

static void open_source(struct jpeg_decompress_struct *cinfo, Py_buffer *data) {
    jpeg_create_decompress(cinfo);
    jpeg_mem_src(cinfo, (const unsigned char *)data->buf, (unsigned long)data->len);
}

static PyObject *header(PyObject *self, PyObject *args) {
    Py_buffer data;
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    init_errors(&cinfo, &err);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, err.message);
        return NULL;
    }
    open_source(&cinfo, &data);
    jpeg_read_header(&cinfo, TRUE);
    PyObject *result = Py_BuildValue("(ii)", (int)cinfo.image_height, (int)cinfo.image_width);
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *decode_crop(PyObject *self, PyObject *args) {
    Py_buffer data;
    int top, left, height, width;
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    PyObject *volatile out = NULL;
    if (!PyArg_ParseTuple(args, "y*iiii", &data, &top, &left, &height, &width)) return NULL;
    init_errors(&cinfo, &err);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_XDECREF(out);
        PyErr_SetString(PyExc_ValueError, err.message);
        return NULL;
    }
    open_source(&cinfo, &data);
    jpeg_read_header(&cinfo, TRUE);
    if (top < 0 || left < 0 || height <= 0 || width <= 0 || (long long)top + height > (long long)cinfo.image_height ||
        (long long)left + width > (long long)cinfo.image_width) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "box (%d, %d, %d, %d) is not inside the %ux%u image", top, left, height,
                     width, cinfo.image_height, cinfo.image_width);
        return NULL;
    }
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);

    /* One more column on each side than the box, for the chroma upsampling's neighbours. */
    JDIMENSION x0 = left > 0 ? (JDIMENSION)left - 1 : 0;
    JDIMENSION x1 = (JDIMENSION)(left + width) < cinfo.output_width ? (JDIMENSION)(left + width) + 1
                                                                     : cinfo.output_width;
    if (x1 - x0 < 32) x1 = x0 + 32 < cinfo.output_width ? x0 + 32 : cinfo.output_width; /* 4:2:0, 1 px wide */
    JDIMENSION xoffset = x0, cols = x1 - x0;
    if (cols < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoffset, &cols); /* moves xoffset left */
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);

    Py_ssize_t stride = (Py_ssize_t)cinfo.output_width * 3; /* output_width is now the cropped width */
    out = PyByteArray_FromStringAndSize(NULL, stride * height);
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(out);
    while (cinfo.output_scanline < (JDIMENSION)(top + height)) {
        JSAMPROW row = pixels + (Py_ssize_t)(cinfo.output_scanline - (JDIMENSION)top) * stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    int rows_out = height, cols_out = (int)cinfo.output_width, x = left - (int)xoffset;
    jpeg_abort_decompress(&cinfo); /* the rows below the box are never decoded */
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return Py_BuildValue("(Niii)", out, rows_out, cols_out, x);
}

static PyMethodDef methods[] = {
    {"header", header, METH_VARARGS, "header(data) -> (height, width) of a JPEG."},
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, top, left, height, width) -> (RGB bytearray, rows, cols, x): decode only that box."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", "Crop-region JPEG decoding (libjpeg-turbo).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
