/*
 * fake_nvml.c: a stand-in for libnvidia-ml.so.1 so that tests drive the real
 * pynvml bindings and the real collector with no GPU on the machine.
 *
 * Built by tests/fake_nvml/build.py against the official nvml.h (PyPI
 * nvidia-nvml-dev), so every signature and struct layout is NVIDIA's:
 *
 *     gcc -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -I<nvml.h dir> fake_nvml.c -o libnvidia-ml.so.1
 *
 * It exports exactly the symbols pynvml resolves for the features the
 * collector uses (pynvml names the versioned ones: nvmlDeviceGetCount_v2,
 * nvmlDeviceGetHandleByIndex_v2, nvmlDeviceGetPciInfo_v3,
 * nvmlDeviceGetComputeRunningProcesses_v3, nvmlEventSetWait_v2).
 *
 * State comes from a scenario file named by $FAKE_NVML_SCENARIO. The file is
 * re-read whenever its path, inode, size or mtime changes, so a test changes
 * the GPU state mid-run by rewriting it (write a temporary file, then rename).
 * With no scenario (variable unset, file missing) the fake acts as a node
 * whose driver is not loaded.
 *
 * Scenario format: one `key=value` per line; `#` starts a comment line.
 * A missing device key means "not supported on this device" unless noted.
 *
 *   driver=1                  0: every call, nvmlInitWithFlags included, returns
 *                             NVML_ERROR_DRIVER_NOT_LOADED (default 1)
 *   gpus=N                    number of physical GPUs (at most 8)
 *   gpuI.uuid=GPU-...         required
 *   gpuI.name=NVIDIA H100 80GB HBM3
 *   gpuI.pci=00000000:17:00.0
 *   gpuI.lost=1               every call on this GPU (and its MIG devices)
 *                             returns NVML_ERROR_GPU_IS_LOST
 *   gpuI.mem_total / gpuI.mem_used        bytes
 *   gpuI.util_gpu / gpuI.util_mem         percent
 *   gpuI.power_mw             milliwatts
 *   gpuI.energy_mj            millijoules since driver load
 *   gpuI.temp_c               degrees Celsius
 *   gpuI.clock_sm_mhz / gpuI.clock_mem_mhz
 *   gpuI.pcie_tx_kbs / gpuI.pcie_rx_kbs   KB/s
 *   gpuI.mig=1                MIG mode enabled (default 0)
 *   gpuI.migs=M               MIG devices (at most 7)
 *   gpuI.migJ.uuid=MIG-...    gpuI.migJ.name, gpuI.migJ.gi, gpuI.migJ.ci,
 *                             gpuI.migJ.mem_total, gpuI.migJ.mem_used
 *                             (MIG devices support memory info only, as on
 *                             real A100/H100 MIG slices)
 *   gpuI.procs=P              compute processes on the physical GPU
 *   gpuI.procK.pid            gpuI.procK.mem (bytes used),
 *                             gpuI.procK.gi / gpuI.procK.ci (MIG placement,
 *                             default 0xFFFFFFFF = none)
 *   gpuI.procK.sm / gpuI.procK.memutil    percent; when absent the process
 *                             has no nvmlDeviceGetProcessUtilization sample
 *   gpuI.procK.ts_us          sample timestamp in microseconds (default: now)
 *   gpuI.proc_util=0          nvmlDeviceGetProcessUtilization is not supported
 *   xids=X                    XID events, delivered once each, in order, to an
 *   xidN=I:CODE               event set that registered GPU I for
 *                             nvmlEventTypeXidCriticalError
 */
#define _GNU_SOURCE
#include <nvml.h>

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define MAX_GPUS 8
#define MAX_MIGS 7
#define MAX_KEYS 1024
#define KEY_LEN 64
#define VAL_LEN 128

struct nvmlDevice_st {
    int gpu;
    int mig; /* -1: the physical GPU */
};

struct nvmlEventSet_st {
    unsigned long long mask[MAX_GPUS];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct nvmlDevice_st gpu_handles[MAX_GPUS];
static struct nvmlDevice_st mig_handles[MAX_GPUS][MAX_MIGS];
static char keys[MAX_KEYS][KEY_LEN];
static char vals[MAX_KEYS][VAL_LEN];
static int nkeys;
static char loaded_path[4096];
static struct stat loaded_st;
static int init_count;
static int xids_delivered;

/* Re-read the scenario when it changed. Called with `lock` held. */
static void reload(void)
{
    const char *path = getenv("FAKE_NVML_SCENARIO");
    struct stat st;
    if (path == NULL || stat(path, &st) != 0) {
        /* no scenario: behave like a node without the NVIDIA driver, so a
         * test that loads no scenario never sees another test's GPUs */
        snprintf(keys[0], KEY_LEN, "driver");
        snprintf(vals[0], VAL_LEN, "0");
        nkeys = 1;
        loaded_path[0] = '\0';
        return;
    }
    if (strcmp(path, loaded_path) == 0 && st.st_ino == loaded_st.st_ino && st.st_size == loaded_st.st_size &&
        st.st_mtim.tv_sec == loaded_st.st_mtim.tv_sec && st.st_mtim.tv_nsec == loaded_st.st_mtim.tv_nsec)
        return;
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    if (strcmp(path, loaded_path) != 0)
        xids_delivered = 0; /* a new scenario starts its event stream afresh */
    snprintf(loaded_path, sizeof loaded_path, "%s", path);
    loaded_st = st;
    nkeys = 0;
    char line[KEY_LEN + VAL_LEN + 8];
    while (fgets(line, sizeof line, f) != NULL && nkeys < MAX_KEYS) {
        line[strcspn(line, "\r\n")] = '\0';
        char *eq = strchr(line, '=');
        if (line[0] == '#' || eq == NULL)
            continue;
        *eq = '\0';
        snprintf(keys[nkeys], KEY_LEN, "%.*s", KEY_LEN - 1, line); /* longer keys are truncated */
        snprintf(vals[nkeys], VAL_LEN, "%.*s", VAL_LEN - 1, eq + 1);
        nkeys++;
    }
    fclose(f);
}

static const char *get(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static const char *get(const char *fmt, ...)
{
    char key[KEY_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof key, fmt, ap);
    va_end(ap);
    for (int i = 0; i < nkeys; i++)
        if (strcmp(keys[i], key) == 0)
            return vals[i];
    return NULL;
}

static unsigned long long num(const char *v, unsigned long long dflt)
{
    return v == NULL ? dflt : strtoull(v, NULL, 0);
}

static int ngpus(void)
{
    int n = (int)num(get("gpus"), 0);
    return n > MAX_GPUS ? MAX_GPUS : n;
}

static int nmigs(int gpu)
{
    if (num(get("gpu%d.mig", gpu), 0) == 0)
        return 0;
    int n = (int)num(get("gpu%d.migs", gpu), 0);
    return n > MAX_MIGS ? MAX_MIGS : n;
}

/* Common entry check: lock held on success (caller unlocks). */
static nvmlReturn_t enter(void)
{
    pthread_mutex_lock(&lock);
    reload();
    if (num(get("driver"), 1) == 0) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    if (init_count == 0) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    return NVML_SUCCESS;
}

/* enter() plus a device check; on success the lock is held. */
static nvmlReturn_t enter_dev(nvmlDevice_t d)
{
    nvmlReturn_t r = enter();
    if (r != NVML_SUCCESS)
        return r;
    if (d == NULL || d->gpu < 0 || d->gpu >= ngpus() || (d->mig >= nmigs(d->gpu))) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (num(get("gpu%d.lost", d->gpu), 0) != 0) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_GPU_IS_LOST;
    }
    return NVML_SUCCESS;
}

/* Read one unsigned device value, or NOT_SUPPORTED when absent or on a MIG device. */
static nvmlReturn_t dev_value(nvmlDevice_t d, const char *field, unsigned long long *out)
{
    nvmlReturn_t r = enter_dev(d);
    if (r != NVML_SUCCESS)
        return r;
    const char *v = d->mig >= 0 ? NULL : get("gpu%d.%s", d->gpu, field);
    if (v != NULL)
        *out = num(v, 0);
    pthread_mutex_unlock(&lock);
    return v == NULL ? NVML_ERROR_NOT_SUPPORTED : NVML_SUCCESS;
}

static nvmlReturn_t copy_str(const char *v, char *buf, unsigned int len)
{
    if (v == NULL)
        v = "";
    if (strlen(v) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, v, strlen(v) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    pthread_mutex_lock(&lock);
    reload();
    nvmlReturn_t r = NVML_SUCCESS;
    if (num(get("driver"), 1) == 0)
        r = NVML_ERROR_DRIVER_NOT_LOADED;
    else
        init_count++;
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlInit_v2(void)
{
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlShutdown(void)
{
    pthread_mutex_lock(&lock);
    nvmlReturn_t r = NVML_SUCCESS;
    if (init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else
        init_count--;
    pthread_mutex_unlock(&lock);
    return r;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t r = enter();
    if (r != NVML_SUCCESS)
        return r;
    r = copy_str("580.95.05-fake", version, length);
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    nvmlReturn_t r = enter();
    if (r != NVML_SUCCESS)
        return r;
    *count = (unsigned int)ngpus();
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t r = enter();
    if (r != NVML_SUCCESS)
        return r;
    if (index >= (unsigned int)ngpus()) {
        r = NVML_ERROR_INVALID_ARGUMENT;
    } else if (num(get("gpu%u.lost", index), 0) != 0) {
        r = NVML_ERROR_GPU_IS_LOST;
    } else {
        gpu_handles[index].gpu = (int)index;
        gpu_handles[index].mig = -1;
        *device = &gpu_handles[index];
    }
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    *index = (unsigned int)device->gpu;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    if (device->mig >= 0)
        r = copy_str(get("gpu%d.mig%d.uuid", device->gpu, device->mig), uuid, length);
    else
        r = copy_str(get("gpu%d.uuid", device->gpu), uuid, length);
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    const char *v = device->mig >= 0 ? get("gpu%d.mig%d.name", device->gpu, device->mig) : NULL;
    r = copy_str(v != NULL ? v : get("gpu%d.name", device->gpu), name, length);
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    memset(pci, 0, sizeof *pci);
    const char *bus = get("gpu%d.pci", device->gpu);
    snprintf(pci->busId, sizeof pci->busId, "%s", bus != NULL ? bus : "00000000:00:00.0");
    unsigned int dom = 0, b = 0, dv = 0;
    if (sscanf(pci->busId, "%x:%x:%x", &dom, &b, &dv) == 3) {
        pci->domain = dom;
        pci->bus = b;
        pci->device = dv;
        snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT, dom & 0xffff, b,
                 dv);
    }
    pci->pciDeviceId = 0x233010de;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode, unsigned int *pendingMode)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    if (device->mig >= 0) {
        r = NVML_ERROR_NOT_SUPPORTED;
    } else {
        *currentMode = *pendingMode = (unsigned int)num(get("gpu%d.mig", device->gpu), 0);
    }
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    *count = num(get("gpu%d.mig", device->gpu), 0) != 0 ? MAX_MIGS : 0;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *migDevice)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    if (device->mig >= 0 || index >= MAX_MIGS) {
        r = NVML_ERROR_INVALID_ARGUMENT;
    } else if (index >= (unsigned int)nmigs(device->gpu)) {
        r = NVML_ERROR_NOT_FOUND; /* an empty slot, as real NVML reports it */
    } else {
        mig_handles[device->gpu][index].gpu = device->gpu;
        mig_handles[device->gpu][index].mig = (int)index;
        *migDevice = &mig_handles[device->gpu][index];
    }
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice, nvmlDevice_t *device)
{
    nvmlReturn_t r = enter_dev(migDevice);
    if (r != NVML_SUCCESS)
        return r;
    if (migDevice->mig < 0) {
        r = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        gpu_handles[migDevice->gpu].gpu = migDevice->gpu;
        gpu_handles[migDevice->gpu].mig = -1;
        *device = &gpu_handles[migDevice->gpu];
    }
    pthread_mutex_unlock(&lock);
    return r;
}

static nvmlReturn_t mig_id(nvmlDevice_t device, const char *field, unsigned int *id)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    if (device->mig < 0)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else
        *id = (unsigned int)num(get("gpu%d.mig%d.%s", device->gpu, device->mig, field), 0);
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    return mig_id(device, "gi", id);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    return mig_id(device, "ci", id);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    unsigned long long g = 0, m = 0;
    nvmlReturn_t r = dev_value(device, "util_gpu", &g);
    if (r == NVML_SUCCESS)
        r = dev_value(device, "util_mem", &m);
    if (r == NVML_SUCCESS) {
        utilization->gpu = (unsigned int)g;
        utilization->memory = (unsigned int)m;
    }
    return r;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    const char *t, *u;
    if (device->mig >= 0) {
        t = get("gpu%d.mig%d.mem_total", device->gpu, device->mig);
        u = get("gpu%d.mig%d.mem_used", device->gpu, device->mig);
    } else {
        t = get("gpu%d.mem_total", device->gpu);
        u = get("gpu%d.mem_used", device->gpu);
    }
    if (t == NULL || u == NULL) {
        r = NVML_ERROR_NOT_SUPPORTED;
    } else {
        memory->total = num(t, 0);
        memory->used = num(u, 0);
        memory->free = memory->total > memory->used ? memory->total - memory->used : 0;
    }
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    unsigned long long v = 0;
    nvmlReturn_t r = dev_value(device, "power_mw", &v);
    if (r == NVML_SUCCESS)
        *power = (unsigned int)v;
    return r;
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    return dev_value(device, "energy_mj", energy);
}

nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_t *temperature)
{
    if (temperature->version != nvmlTemperature_v1)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (temperature->sensorType != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_NOT_SUPPORTED;
    unsigned long long v = 0;
    nvmlReturn_t r = dev_value(device, "temp_c", &v);
    if (r == NVML_SUCCESS)
        temperature->temperature = (int)v;
    return r;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType, unsigned int *temp)
{
    if (sensorType != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_NOT_SUPPORTED;
    unsigned long long v = 0;
    nvmlReturn_t r = dev_value(device, "temp_c", &v);
    if (r == NVML_SUCCESS)
        *temp = (unsigned int)v;
    return r;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock)
{
    unsigned long long v = 0;
    nvmlReturn_t r;
    if (type == NVML_CLOCK_SM)
        r = dev_value(device, "clock_sm_mhz", &v);
    else if (type == NVML_CLOCK_MEM)
        r = dev_value(device, "clock_mem_mhz", &v);
    else
        return NVML_ERROR_NOT_SUPPORTED;
    if (r == NVML_SUCCESS)
        *clock = (unsigned int)v;
    return r;
}

nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t device, nvmlPcieUtilCounter_t counter, unsigned int *value)
{
    unsigned long long v = 0;
    nvmlReturn_t r = dev_value(device, counter == NVML_PCIE_UTIL_TX_BYTES ? "pcie_tx_kbs" : "pcie_rx_kbs", &v);
    if (r == NVML_SUCCESS)
        *value = (unsigned int)v;
    return r;
}

/* The two-call protocol: with too small a buffer, report the count and
 * NVML_ERROR_INSUFFICIENT_SIZE; with no processes, NVML_SUCCESS and 0. */
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    unsigned int n = device->mig >= 0 ? 0 : (unsigned int)num(get("gpu%d.procs", device->gpu), 0);
    if (infos == NULL || *infoCount < n) {
        r = n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
        *infoCount = n;
        pthread_mutex_unlock(&lock);
        return r;
    }
    for (unsigned int k = 0; k < n; k++) {
        infos[k].pid = (unsigned int)num(get("gpu%d.proc%u.pid", device->gpu, k), 0);
        infos[k].usedGpuMemory = num(get("gpu%d.proc%u.mem", device->gpu, k), 0);
        infos[k].gpuInstanceId = (unsigned int)num(get("gpu%d.proc%u.gi", device->gpu, k), 0xFFFFFFFFu);
        infos[k].computeInstanceId = (unsigned int)num(get("gpu%d.proc%u.ci", device->gpu, k), 0xFFFFFFFFu);
    }
    *infoCount = n;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

static unsigned long long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000ULL;
}

/* Samples newer than lastSeenTimeStamp, one per process that has an `sm`
 * value; NVML_ERROR_NOT_FOUND when there are none (as real NVML answers). */
nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device, nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *processSamplesCount,
                                             unsigned long long lastSeenTimeStamp)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    if (device->mig >= 0 || num(get("gpu%d.proc_util", device->gpu), 1) == 0) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_NOT_SUPPORTED;
    }
    unsigned int nprocs = (unsigned int)num(get("gpu%d.procs", device->gpu), 0);
    unsigned long long now = now_us();
    unsigned int n = 0;
    for (unsigned int k = 0; k < nprocs; k++) {
        const char *sm = get("gpu%d.proc%u.sm", device->gpu, k);
        unsigned long long ts = num(get("gpu%d.proc%u.ts_us", device->gpu, k), now);
        if (sm == NULL || ts <= lastSeenTimeStamp)
            continue;
        if (utilization != NULL && n < *processSamplesCount) {
            utilization[n].pid = (unsigned int)num(get("gpu%d.proc%u.pid", device->gpu, k), 0);
            utilization[n].timeStamp = ts;
            utilization[n].smUtil = (unsigned int)num(sm, 0);
            utilization[n].memUtil = (unsigned int)num(get("gpu%d.proc%u.memutil", device->gpu, k), 0);
            utilization[n].encUtil = 0;
            utilization[n].decUtil = 0;
        }
        n++;
    }
    if (n == 0)
        r = NVML_ERROR_NOT_FOUND;
    else if (utilization == NULL || *processSamplesCount < n)
        r = NVML_ERROR_INSUFFICIENT_SIZE;
    *processSamplesCount = n;
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    nvmlReturn_t r = enter();
    if (r != NVML_SUCCESS)
        return r;
    pthread_mutex_unlock(&lock);
    *set = calloc(1, sizeof **set);
    return *set == NULL ? NVML_ERROR_MEMORY : NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set)
{
    nvmlReturn_t r = enter_dev(device);
    if (r != NVML_SUCCESS)
        return r;
    if (device->mig >= 0 || set == NULL)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if ((eventTypes & ~nvmlEventTypeXidCriticalError) != 0)
        r = NVML_ERROR_NOT_SUPPORTED;
    else
        set->mask[device->gpu] |= eventTypes;
    pthread_mutex_unlock(&lock);
    return r;
}

/* Deliver the next XID from the scenario, polling the file every 10 ms up
 * to timeoutms (a blocking wait, like the real call, never a busy loop). */
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    struct timespec slice = {0, 10 * 1000 * 1000};
    unsigned int waited = 0;
    for (;;) {
        nvmlReturn_t r = enter();
        if (r != NVML_SUCCESS)
            return r;
        int total = (int)num(get("xids"), 0);
        while (xids_delivered < total) {
            const char *ev = get("xid%d", xids_delivered);
            xids_delivered++;
            unsigned int gpu = 0;
            unsigned long long code = 0;
            if (ev == NULL || sscanf(ev, "%u:%llu", &gpu, &code) != 2 || gpu >= (unsigned int)ngpus())
                continue;
            if ((set->mask[gpu] & nvmlEventTypeXidCriticalError) == 0)
                continue;
            gpu_handles[gpu].gpu = (int)gpu;
            gpu_handles[gpu].mig = -1;
            data->device = &gpu_handles[gpu];
            data->eventType = nvmlEventTypeXidCriticalError;
            data->eventData = code;
            data->gpuInstanceId = 0xFFFFFFFFu;
            data->computeInstanceId = 0xFFFFFFFFu;
            pthread_mutex_unlock(&lock);
            return NVML_SUCCESS;
        }
        pthread_mutex_unlock(&lock);
        if (waited >= timeoutms)
            return NVML_ERROR_TIMEOUT;
        nanosleep(&slice, NULL);
        waited += 10;
    }
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    free(set);
    return NVML_SUCCESS;
}
