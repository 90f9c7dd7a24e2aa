//! The project CA and enrollment: keys and certificates (pki), the state database (db), and
//! the enrollment protocol (enroll).

pub mod db;
pub mod enroll;
pub mod pki;
