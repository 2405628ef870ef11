/* Threads for cpu_qmm.c (included by it, once; not compiled on its own).
 *
 * A job is n chunks claimed through one atomic counter, a few consecutive ones at a time. The
 * caller works on its own job and waits only for chunks a worker has already claimed, never
 * for a worker to show up: on a busy machine a descheduled worker costs nothing, where a
 * fork/join barrier (OpenMP) would stall every call until it runs again. Workers spin briefly
 * after a job (decode issues matmuls back to back), then sleep on a condition variable; at once
 * while the caller waits on other ranks (g_resting), whose processes may need these cores.
 */
#define SPIN_NS 100000
#define MAX_THREADS 256
#define MIN_SHARED_BYTES (96 << 10)  /* below this a job is shorter than waking a sleeping worker */
#define CLAIM_BYTES (64 << 10)

typedef void (*chunk_fn)(const void*, int64_t);  /* runs chunk i of a job on its argument */

typedef struct job {
    chunk_fn fn;
    const void* a;  /* what fn reads */
    int64_t n;
    int64_t per;  /* consecutive chunks per claim */
    atomic_llong next;
    atomic_int active;  /* workers inside run_chunks: joined under g_mu, left without it */
    long gen;
} job_t;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER, g_call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_wake = PTHREAD_COND_INITIALIZER;
static job_t* g_job = NULL;
static atomic_long g_gen = 0;
static int g_threads = 0;  /* per job, the caller included; 0 until first use */
static int g_started = 0;  /* worker threads running */
static atomic_int g_resting = 0;  /* set: the caller waits on something else, workers sleep at once */

static inline void cpu_relax(void) {
#ifdef MM_X86
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void run_chunks(job_t* j) {
    for (int64_t i; (i = atomic_fetch_add(&j->next, j->per)) < j->n;)
        for (int64_t k = i; k < i + j->per && k < j->n; k++) j->fn(j->a, k);
}

/* chunks per claim: ~CLAIM_BYTES of weights, and at least 4 claims per thread. A small model's
 * chunk (16 rows of K 576: 4.6 KB) claimed one at a time interleaves the threads every few KB,
 * so neither sees a stream its prefetchers can follow: SmolLM2 decoded 1.3x faster on 2 threads
 * with 64 KB claims (8.1 -> 6.0 ms/token, Ice Lake Xeon; 32 and 128-256 KB were slower). Large
 * matrices' chunks are 64 KB or more already and keep claims of one. */
static int64_t claim_size(int64_t n, int64_t bytes, int threads) {
    int64_t per = bytes / n > 0 ? CLAIM_BYTES / (bytes / n) : 1;
    int64_t most = n / (4 * (int64_t)threads);
    if (per > most) per = most;
    return per < 1 ? 1 : per;
}

static void* worker(void* arg) {
    int id = (int)(intptr_t)arg;
    long seen = 0;
    for (;;) {
        int64_t until = now_ns() + SPIN_NS;
        for (int s = 0; atomic_load(&g_gen) == seen; s++) {
            if ((s & 255) == 255 && (now_ns() > until || atomic_load(&g_resting))) break;
            cpu_relax();
        }
        pthread_mutex_lock(&g_mu);
        while (!(g_job && g_job->gen != seen && id < g_threads - 1)) {
            seen = g_job ? g_job->gen : atomic_load(&g_gen);  /* nothing for us up to here */
            pthread_cond_wait(&g_wake, &g_mu);
        }
        job_t* j = g_job;
        seen = j->gen;
        j->active++;
        pthread_mutex_unlock(&g_mu);
        run_chunks(j);
        atomic_fetch_sub(&j->active, 1);  /* the last touch of j: the caller may return now */
    }
    return NULL;
}

/* start workers up to n - 1; call with g_mu held */
static void set_threads_locked(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    g_threads = n;
    while (g_started < n - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker, (void*)(intptr_t)g_started);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;  /* fewer threads, same results */
        g_started++;
    }
}

/* n chunks over `bytes` of packed weights; small jobs run on the caller alone */
static void run_job(chunk_fn fn, const void* a, int64_t n, int64_t bytes) {
    pthread_mutex_lock(&g_call_mu);  /* one job at a time, whichever thread calls */
    pthread_mutex_lock(&g_mu);
    if (g_threads == 0) set_threads_locked((int)sysconf(_SC_NPROCESSORS_ONLN));
    int alone = g_threads == 1 || n == 1 || bytes < MIN_SHARED_BYTES;
    job_t j = {fn, a, n, alone ? n : claim_size(n, bytes, g_threads), 0, 0, 0};
    if (!alone) {
        j.gen = atomic_fetch_add(&g_gen, 1) + 1;
        g_job = &j;
        pthread_cond_broadcast(&g_wake);
    }
    pthread_mutex_unlock(&g_mu);
    run_chunks(&j);
    if (!alone) {
        pthread_mutex_lock(&g_mu);
        g_job = NULL;  /* no one joins from here on; wait for chunks already claimed */
        pthread_mutex_unlock(&g_mu);
        /* spin: a claimed chunk ends within microseconds, and a futex wake-up costs more than
         * that on a VM; yield the core if a worker was descheduled mid-chunk */
        for (int s = 0; atomic_load(&j.active) > 0; s++) {
            if (s < 4096)
                cpu_relax();
            else
                sched_yield();
        }
    }
    pthread_mutex_unlock(&g_call_mu);
}

int mm_threads(void) {
    pthread_mutex_lock(&g_mu);
    if (g_threads == 0) set_threads_locked((int)sysconf(_SC_NPROCESSORS_ONLN));
    int n = g_threads;
    pthread_mutex_unlock(&g_mu);
    return n;
}

void mm_set_threads(int n) {
    pthread_mutex_lock(&g_mu);
    set_threads_locked(n);
    pthread_mutex_unlock(&g_mu);
}
