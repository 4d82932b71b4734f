/* agentfs._spawn: start one tick's program inside the sandbox, set up between vfork(2) and
 * execve(2) with system calls alone.
 *
 * Why C: the zygote used to fork itself (Python) and set the child up in Python, which cost
 * ~1.6 ms for the fork and 2-3 ms for an exec out of a large copied address space, per tick.
 * A vfork child shares the zygote's memory until it execs, so nothing is copied; it makes its
 * own mount and IPC namespace, a fresh /tmp, becomes the agent's uid, applies the resource
 * limits and Landlock, and execs (the seccomp filter it inherits: the zygote loads it on
 * itself, once).  No library does that sequence in one
 * exec (bwrap, setpriv, prlimit and unshare would be four), so it is written here, small.
 *
 * Rules for the child (it runs on the zygote's stack and memory): raw system calls only, no
 * malloc, no stdio, no Python; every buffer it needs is made by the parent beforehand.  Its
 * credentials change with raw syscalls, not glibc's setresuid(), which would signal the
 * zygote's threads to change theirs too.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mount.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x4
#endif
#define LANDLOCK_RULE_PATH_BENEATH 1
#define LANDLOCK_RULE_NET_PORT 2

/* Landlock's structures as of ABI 6 (Linux 6.12); Debian's headers may predate them. */
struct ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};
struct path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));
struct net_port_attr {
    uint64_t allowed_access;
    uint64_t port;
};

#define MAX_LIST 64 /* tools, pins, writable paths, limits: each at most this many */

/* What the child must do, prepared by the parent: only pointers into memory that lives
 * until the child has exec'd or died. */
struct plan {
    const char *const *candidates; /* execve(2) tries each in turn (PATH search done) */
    char *const *argv;
    char *const *envp;
    int stdio[3];
    uid_t uid;
    gid_t gid;
    const char *tmp_options; /* mount data for the fresh /tmp and /dev/shm */
    int npins;
    const char *pin_from[MAX_LIST], *pin_to[MAX_LIST];
    int ntools;
    const char *tool_path[MAX_LIST];
    int tool_fd[MAX_LIST];
    int tool_is_dir[MAX_LIST];
    int nwritable;
    const char *writable[MAX_LIST];
    uint64_t fs_all, fs_read, net_handled, net_connect, scoped;
    int proxy_port;
    int nlimits;
    int limit_resource[MAX_LIST];
    rlim_t limit_value[MAX_LIST];
    int nignored;
    int ignored[MAX_LIST];
    const char *cwd;
    int join, join_ipc; /* the namespaces kept from this agent's earlier tick, or -1 */
    /* Written by the child on failure (shared memory: the parent reads it after vfork). */
    volatile int failed_errno;
    volatile const char *failed_step;
};

/* mkdir -p inside the child, with a buffer on its stack; of the path's parent alone when
 * `parent_only`. */
static int make_dirs(const char *path, int parent_only)
{
    char buffer[4096];
    size_t length = strlen(path);
    if (length >= sizeof buffer)
        return -ENAMETOOLONG;
    memcpy(buffer, path, length + 1);
    if (parent_only) {
        while (length > 1 && buffer[length - 1] != '/')
            length--;
        buffer[--length] = '\0';
    }
    for (size_t i = 1; i <= length; i++) {
        if (buffer[i] == '/' || buffer[i] == '\0') {
            char saved = buffer[i];
            buffer[i] = '\0';
            if (syscall(SYS_mkdirat, AT_FDCWD, buffer, 0755) != 0 && errno != EEXIST)
                return -errno;
            buffer[i] = saved;
        }
    }
    return 0;
}

#define STEP(what, expression)                   \
    do {                                         \
        if ((expression) < 0) {                  \
            plan->failed_errno = errno;          \
            plan->failed_step = (what);          \
            goto fail;                           \
        }                                        \
    } while (0)

/* Write a sysctl of the namespaces just made. */
static int set_sysctl(const char *path, const char *value)
{
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = syscall(SYS_write, fd, value, strlen(value));
    int saved = errno;
    syscall(SYS_close, fd);
    errno = saved;
    return n < 0 ? -1 : 0;
}

static int own_tmp(struct plan *plan)
{
    STEP("unshare", syscall(SYS_unshare, CLONE_NEWNS | CLONE_NEWIPC));
    /* The IPC namespace lives as long as the agent's view (its later ticks join it): no
     * shared memory segment outlives its last user, and few message queues fit. */
    STEP("sysctl shm_rmid_forced", set_sysctl("/proc/sys/kernel/shm_rmid_forced", "1"));
    STEP("sysctl msgmni", set_sysctl("/proc/sys/kernel/msgmni", "16"));
    STEP("mount / private", syscall(SYS_mount, NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL));
    STEP("mount /tmp", syscall(SYS_mount, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
                               plan->tmp_options));
    STEP("mount /dev/shm", syscall(SYS_mount, "tmpfs", "/dev/shm", "tmpfs",
                                   MS_NOSUID | MS_NODEV, plan->tmp_options));
    for (int i = 0; i < plan->npins; i++) {
        int made = make_dirs(plan->pin_to[i], 0);
        if (made < 0) {
            errno = -made;
            STEP("mkdir pin", -1);
        }
        STEP("mount pin", syscall(SYS_mount, plan->pin_from[i], plan->pin_to[i], NULL,
                                  MS_BIND | MS_REC, NULL));
    }
    for (int i = 0; i < plan->ntools; i++) {
        /* The mount point: a directory or an empty file, made here, after the fresh /tmp,
         * since a tool may live under /tmp (outside it, in the root only root may write). */
        int made = make_dirs(plan->tool_path[i], !plan->tool_is_dir[i]);
        if (made < 0) {
            errno = -made;
            STEP("mkdir tool", -1);
        }
        if (!plan->tool_is_dir[i]) {
            int fd = (int)syscall(SYS_openat, AT_FDCWD, plan->tool_path[i],
                                  O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
            STEP("create tool", fd);
            syscall(SYS_close, fd);
        }
        STEP("move_mount tool", syscall(SYS_move_mount, plan->tool_fd[i], "", AT_FDCWD,
                                        plan->tool_path[i], MOVE_MOUNT_F_EMPTY_PATH));
        STEP("remount tool", syscall(SYS_mount, NULL, plan->tool_path[i], NULL,
                                     MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
                                     NULL));
    }
    return 0;
fail:
    return -1;
}

/* A later tick of the same agent: the mount and IPC namespaces its earlier tick made (its
 * /tmp, /dev/shm, pins and tools, left empty: the zygote checked), joined instead of made
 * anew, which costs ~20 us instead of ~0.15 ms to make and ~0.2 ms to tear down. */
static int join_view(struct plan *plan)
{
    STEP("setns", syscall(SYS_setns, plan->join, CLONE_NEWNS));
    STEP("setns ipc", syscall(SYS_setns, plan->join_ipc, CLONE_NEWIPC));
    return 0;
fail:
    return -1;
}


/* Landlock: read and execute everything, write beneath the writable paths, TCP connect
 * to the proxy's port only; abstract sockets and signals scoped to this tick's domain.
 * Built here, after this child's own /tmp exists: Landlock's rules name inodes, and the
 * fresh tmpfs hides the directory the zygote's /tmp rule would name. */
static int landlock(struct plan *plan)
{
    struct ruleset_attr attr = {plan->fs_all, plan->net_handled, plan->scoped};
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
    STEP("landlock ruleset", ruleset);
    struct path_beneath_attr beneath = {plan->fs_read, -1};
    STEP("landlock open /", beneath.parent_fd = (int)syscall(SYS_openat, AT_FDCWD, "/",
                                                             O_PATH | O_CLOEXEC));
    STEP("landlock rule /", syscall(SYS_landlock_add_rule, ruleset,
                                    LANDLOCK_RULE_PATH_BENEATH, &beneath, 0));
    syscall(SYS_close, beneath.parent_fd);
    for (int i = 0; i < plan->nwritable; i++) {
        beneath.allowed_access = plan->fs_all;
        STEP("landlock open", beneath.parent_fd = (int)syscall(
                                  SYS_openat, AT_FDCWD, plan->writable[i], O_PATH | O_CLOEXEC));
        STEP("landlock rule", syscall(SYS_landlock_add_rule, ruleset,
                                      LANDLOCK_RULE_PATH_BENEATH, &beneath, 0));
        syscall(SYS_close, beneath.parent_fd);
    }
    struct net_port_attr port = {plan->net_connect, (uint64_t)plan->proxy_port};
    STEP("landlock port", syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_NET_PORT,
                                  &port, 0));
    STEP("landlock restrict", syscall(SYS_landlock_restrict_self, ruleset, 0));
    syscall(SYS_close, ruleset);
    return 0;
fail:
    return -1;
}

static void child(struct plan *plan) __attribute__((noreturn));
static void child(struct plan *plan)
{
    /* Signals the zygote ignores go back to their defaults (exec resets the handled ones,
     * but would keep an ignored SIGPIPE ignored); the mask the parent set is cleared last. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int i = 0; i < plan->nignored; i++)
        sigaction(plan->ignored[i], &dfl, NULL);
    STEP("setsid", syscall(SYS_setsid));
    if ((plan->join >= 0 ? join_view(plan) : own_tmp(plan)) < 0)
        goto fail;
    for (int n = 0; n < 3; n++) /* the parent saw to it that each is above 2 */
        STEP("dup2", syscall(SYS_dup3, plan->stdio[n], n, 0));
    STEP("close_range", syscall(SYS_close_range, 3, ~0U, 0));
    STEP("setgroups", syscall(SYS_setgroups, 0, NULL));
    STEP("setresgid", syscall(SYS_setresgid, plan->gid, plan->gid, plan->gid));
    STEP("setresuid", syscall(SYS_setresuid, plan->uid, plan->uid, plan->uid));
    for (int i = 0; i < plan->nlimits; i++) {
        struct rlimit limit = {plan->limit_value[i], plan->limit_value[i]};
        STEP("setrlimit", syscall(SYS_prlimit64, 0, plan->limit_resource[i], &limit, NULL));
    }
    STEP("chdir", syscall(SYS_chdir, plan->cwd));
    STEP("no_new_privs", syscall(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
    if (landlock(plan) < 0)
        goto fail;
    sigset_t none;
    sigemptyset(&none);
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof(long));
    int first_error = 0;
    for (int i = 0; plan->candidates[i] != NULL; i++) {
        syscall(SYS_execve, plan->candidates[i], plan->argv, plan->envp);
        /* As execvp(3): a file that is there but cannot run says more than one not there. */
        if (first_error == 0 || (first_error == ENOENT && errno != ENOENT))
            first_error = errno;
    }
    errno = first_error;
    STEP("exec", -1);
fail:
    syscall(SYS_exit_group, 127);
    __builtin_unreachable();
}

/* -- the Python face ------------------------------------------------------------------ */

/* A list of str/bytes as a NULL-terminated array; the bytes objects are kept in `keep`. */
static char **string_array(PyObject *sequence, PyObject *keep, const char *what)
{
    PyObject *items = PySequence_Fast(sequence, what);
    if (items == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    char **array = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (array == NULL) {
        Py_DECREF(items);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *encoded = NULL;
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(items, i), &encoded) ||
            PyList_Append(keep, encoded) < 0) {
            Py_XDECREF(encoded);
            Py_DECREF(items);
            PyMem_Free(array);
            return NULL;
        }
        array[i] = PyBytes_AS_STRING(encoded);
        Py_DECREF(encoded);
    }
    Py_DECREF(items);
    return array;
}

/* Copy up to MAX_LIST strings of `sequence` into `out`; the count, or -1. */
static int string_list(PyObject *sequence, PyObject *keep, const char **out, const char *what)
{
    char **array = string_array(sequence, keep, what);
    if (array == NULL)
        return -1;
    int n = 0;
    while (array[n] != NULL) {
        if (n == MAX_LIST) {
            PyMem_Free(array);
            PyErr_Format(PyExc_ValueError, "more than %d %s", MAX_LIST, what);
            return -1;
        }
        out[n] = array[n];
        n++;
    }
    PyMem_Free(array);
    return n;
}

PyDoc_STRVAR(spawn_doc,
"spawn(candidates, argv, env, stdio, uid, gid, tmp_options, pins, tools, writable,\n"
"      landlock, proxy_port, limits, ignored, cwd, join)\n"
"      -> (pid, mount_ns_fd, ipc_ns_fd, tmp_fd, shm_fd)\n\n"
"Start a program in a mount and IPC namespace of its own, as uid/gid, confined.\n"
"candidates: the paths execve(2) tries in turn; env: 'NAME=VALUE' strings; stdio: three\n"
"descriptors; pins: (from, to) bind mounts made in the fresh /tmp; tools: (path, fd,\n"
"is_dir) mount trees (open_tree(2)) attached read-only; landlock: (fs_all, fs_read, net_handled,\n"
"net_connect, scoped); limits: (resource, value) pairs; ignored: signals the\n"
"caller ignores, reset to their defaults; join: (mount_ns_fd, ipc_ns_fd) of an earlier\n"
"call to enter instead of making namespaces (then pins and tools are not attached again),\n"
"or (-1, -1).  Unless it joined, the result holds the child's new namespaces and its /tmp\n"
"and /dev/shm (each -1 if the child is gone already): keep them while they may be\n"
"joined, close them after reaping.  The seccomp filter is the caller's own, inherited.\n"
"Raises OSError naming the step that failed; the child then has exited 127 (reap it).");

static PyObject *spawn(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *candidates_obj, *argv_obj, *env_obj, *pins_obj, *tools_obj, *writable_obj;
    PyObject *limits_obj, *ignored_obj;
    const char *tmp_options, *cwd;
    struct plan plan;
    memset(&plan, 0, sizeof plan);
    unsigned long long fs_all, fs_read, net_handled, net_connect, scoped;
    unsigned int uid, gid;
    if (!PyArg_ParseTuple(args, "OOO(iii)IIsOOO(KKKKK)iOOs(ii):spawn", &candidates_obj,
                          &argv_obj, &env_obj, &plan.stdio[0], &plan.stdio[1], &plan.stdio[2],
                          &uid, &gid, &tmp_options, &pins_obj, &tools_obj, &writable_obj,
                          &fs_all, &fs_read, &net_handled, &net_connect, &scoped,
                          &plan.proxy_port, &limits_obj, &ignored_obj, &cwd,
                          &plan.join, &plan.join_ipc))
        return NULL;
    PyObject *keep = PyList_New(0);
    char **candidates = NULL, **argv = NULL, **envp = NULL;
    PyObject *result = NULL;
    if (keep == NULL)
        goto done;
    for (int n = 0; n < 3; n++)
        if (plan.stdio[n] <= 2) {
            PyErr_SetString(PyExc_ValueError, "stdio descriptors must be above 2");
            goto done;
        }
    plan.uid = uid;
    plan.gid = gid;
    plan.tmp_options = tmp_options;
    plan.cwd = cwd;
    plan.fs_all = fs_all;
    plan.fs_read = fs_read;
    plan.net_handled = net_handled;
    plan.net_connect = net_connect;
    plan.scoped = scoped;
    if ((candidates = string_array(candidates_obj, keep, "candidates")) == NULL ||
        (argv = string_array(argv_obj, keep, "argv")) == NULL ||
        (envp = string_array(env_obj, keep, "env")) == NULL)
        goto done;
    if (candidates[0] == NULL || argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "nothing to run");
        goto done;
    }
    if ((plan.nwritable = string_list(writable_obj, keep, plan.writable, "writable paths")) < 0)
        goto done;
    /* pins and tools: pairs */
    PyObject *pairs = PySequence_Fast(pins_obj, "pins");
    if (pairs == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(pairs); i++) {
        PyObject *from, *to;
        if (i == MAX_LIST) {
            PyErr_SetString(PyExc_ValueError, "too many pins");
            Py_DECREF(pairs);
            goto done;
        }
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(pairs, i), "O&O&", PyUnicode_FSConverter,
                              &from, PyUnicode_FSConverter, &to)) {
            Py_DECREF(pairs);
            goto done;
        }
        PyList_Append(keep, from);
        PyList_Append(keep, to);
        plan.pin_from[i] = PyBytes_AS_STRING(from);
        plan.pin_to[i] = PyBytes_AS_STRING(to);
        Py_DECREF(from);
        Py_DECREF(to);
        plan.npins = (int)i + 1;
    }
    Py_DECREF(pairs);
    pairs = PySequence_Fast(tools_obj, "tools");
    if (pairs == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(pairs); i++) {
        PyObject *path;
        if (i == MAX_LIST) {
            PyErr_SetString(PyExc_ValueError, "too many tools");
            Py_DECREF(pairs);
            goto done;
        }
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(pairs, i), "O&ip", PyUnicode_FSConverter,
                              &path, &plan.tool_fd[i], &plan.tool_is_dir[i])) {
            Py_DECREF(pairs);
            goto done;
        }
        PyList_Append(keep, path);
        plan.tool_path[i] = PyBytes_AS_STRING(path);
        Py_DECREF(path);
        plan.ntools = (int)i + 1;
    }
    Py_DECREF(pairs);
    pairs = PySequence_Fast(limits_obj, "limits");
    if (pairs == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(pairs); i++) {
        unsigned long long value;
        if (i == MAX_LIST) {
            PyErr_SetString(PyExc_ValueError, "too many limits");
            Py_DECREF(pairs);
            goto done;
        }
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(pairs, i), "iK",
                              &plan.limit_resource[i], &value)) {
            Py_DECREF(pairs);
            goto done;
        }
        plan.limit_value[i] = (rlim_t)value;
        plan.nlimits = (int)i + 1;
    }
    Py_DECREF(pairs);
    PyObject *numbers = PySequence_Fast(ignored_obj, "ignored signals");
    if (numbers == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(numbers); i++) {
        if (i == MAX_LIST) {
            PyErr_SetString(PyExc_ValueError, "too many signals");
            Py_DECREF(numbers);
            goto done;
        }
        plan.ignored[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(numbers, i));
        plan.nignored = (int)i + 1;
    }
    Py_DECREF(numbers);
    if (PyErr_Occurred())
        goto done;
    plan.candidates = (const char *const *)candidates;
    plan.argv = argv;
    plan.envp = envp;

    /* No signal handler may run in the child while it shares the zygote's memory. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = vfork();
    if (pid == 0)
        child(&plan);
    int saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        errno = saved;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (plan.failed_step != NULL) {
        PyObject *message = PyUnicode_FromFormat("%s: %s", (const char *)plan.failed_step,
                                                 strerror(plan.failed_errno));
        PyObject *error = message == NULL ? NULL : PyObject_CallFunction(
            PyExc_OSError, "iOn", plan.failed_errno, message, (Py_ssize_t)pid);
        Py_XDECREF(message);
        if (error != NULL) {
            /* The pid rides along as the exception's third argument, where OSError keeps
             * a filename: the caller reaps the child by it. */
            PyErr_SetObject((PyObject *)Py_TYPE(error), error);
            Py_DECREF(error);
        }
        goto done;
    }
    /* The child's new mount namespace, held until the caller closes this: otherwise the
     * namespace (and its /tmp) is torn down in the program's exit, which then waits for
     * the unmount before its parent hears of it; held, the caller frees it after it has
     * reported the exit, or keeps it for the agent's next tick.  Its /tmp and /dev/shm,
     * reached through the child's root, tell the caller whether the tick left anything. */
    int ns = -1, ipc = -1, tmp = -1, shm = -1;
    if (plan.join < 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/ns/mnt", (int)pid);
        ns = open(path, O_RDONLY | O_CLOEXEC);
        snprintf(path, sizeof path, "/proc/%d/ns/ipc", (int)pid);
        ipc = open(path, O_RDONLY | O_CLOEXEC);
        snprintf(path, sizeof path, "/proc/%d/root/tmp", (int)pid);
        tmp = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        snprintf(path, sizeof path, "/proc/%d/root/dev/shm", (int)pid);
        shm = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    result = Py_BuildValue("(iiiii)", (int)pid, ns, ipc, tmp, shm);
done:
    PyMem_Free(candidates);
    PyMem_Free(argv);
    PyMem_Free(envp);
    Py_XDECREF(keep);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS, spawn_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agentfs._spawn",
    "Start a tick's program confined, between vfork(2) and execve(2).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__spawn(void)
{
    return PyModule_Create(&module);
}
