/* The VSIC's compiled request check: shared declarations (also fed to cffi's cdef).
 *
 * C only decides and translates: for each request descriptor of a batch it gives either
 * the completion status VsicFunction._check would give, or the physical runs to perform.
 * The Python model mirrors the function's VSA extents and DMA table into these structures
 * (vdev/fast/vsic_mirror.py) and still does the I/O, completions and rate limiting. No
 * pointer into an application's memory is kept: the DMA map holds addresses and rights
 * only, and the descriptor array is passed to each call.
 */
#define VS_DESC_SIZE 32       /* layout.VSIC_DESC_SIZE */
#define VS_BLOCK_SIZE 4096    /* layout.VSIC_BLOCK_SIZE */
#define VS_MAX_REQUEST_BLOCKS 256  /* layout.VSIC_MAX_REQUEST_BLOCKS */
#define VS_OP_READ 1
#define VS_OP_WRITE 2
#define VS_OP_FLUSH 3
#define VS_KNOWN_FLAGS 1      /* layout.VSIC_KNOWN_FLAGS (FUA) */
/* layout.DESC_* completion statuses */
#define VS_OK 0
#define VS_IOMMU_FAULT 1
#define VS_BAD_LENGTH 2
#define VS_READ_ONLY 8
#define VS_OUT_OF_RANGE 5
#define VS_BAD_OPCODE 6
#define VS_MISALIGNED 7
/* not a status: the Python model checks this request itself */
#define VS_FALLBACK 0xFFFF

typedef struct {
    uint64_t iova;
    uint64_t size;
    uint64_t readable;
    uint64_t writable;
} vs_map;

typedef struct {
    uint64_t vsa_start;   /* first VSA block of the extent */
    uint64_t physical;
    uint64_t count;
} vs_extent;

typedef struct {
    const vs_map *maps;          /* sorted by iova, disjoint (as DmaTable keeps them) */
    uint32_t nmaps;
    uint32_t read_only;
    const vs_extent *extents;    /* in VSA order: vsa_start strictly increasing */
    uint32_t nextents;
    uint32_t pad;
    uint64_t capacity;           /* VSA blocks: the sum of the extents' counts */
} vs_fn;

/* One checked request: the descriptor's fields as C read them (the Python model acts on
 * this copy, never on the ring again), and the verdict. All words are 64-bit so Python
 * reads a batch with one ffi.unpack. */
typedef struct {
    uint64_t status;      /* VS_OK, an error status, or VS_FALLBACK */
    uint64_t opcode_flags;/* opcode | flags << 8 */
    uint64_t tag;
    uint64_t vsa_block;
    uint64_t block_count;
    uint64_t buffer_iova;
    uint64_t map;         /* VS_OK read/write: index of the mapping that holds the buffer */
    uint64_t runs;        /* first run index | run count << 32 */
} vs_req;

typedef struct {
    uint64_t physical;    /* first physical block */
    uint64_t count;       /* blocks */
    uint64_t offset;      /* byte offset of the run's data in the mapping's memory */
} vs_run;

/* Check descriptors first .. first + count - 1 (free-running ring indices) of the ring whose
 * descriptor array is descs (ring_size descriptors, descs_len bytes) and which lies at
 * [ring_iova, ring_iova + descs_len). Fills out[0..n) and runs, and returns n <= count. It
 * stops early, so Python calls again from first + n after acting on the n results:
 *   - after a read whose buffer overlaps the descriptor array (the read rewrites
 *     descriptors the Python model would fetch only after it);
 *   - before a request whose runs do not fit in the max_runs left.
 * Returns 0 for a ring C cannot describe (the caller uses the Python model). *runs_used says
 * how many runs the n results fill, so Python reads them back in one go. */
uint32_t vs_check_batch(const vs_fn *fn, const uint8_t *descs, uint64_t descs_len, uint32_t ring_size,
                        uint64_t ring_iova, uint32_t first, uint32_t count, vs_req *out, vs_run *runs,
                        uint32_t max_runs, uint32_t *runs_used);
